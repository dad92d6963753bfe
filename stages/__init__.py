"""lmsys-chat-1m-synth: one entry module per DVC stage (`python -m stages.<name>`) over `stages.core`."""
