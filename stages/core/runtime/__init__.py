"""Running a stage: sharded work with checkpoints, executors (local, Ray) that own the engines,
the translators of rows the release lacks. Imports config, storage, rows and engines."""
