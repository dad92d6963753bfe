"""package@<variant>: the release directory: public jsonl.gz and Parquet records with the
published field names, the Japanese instructions gpg-encrypted (named after the variant's subset),
a dataset card (README.md), a manifest with the release's provenance, metrics and plot tables.

Rows are streamed in batches: memory does not grow with the size of the release. Every file is
written under a temporary name and the release directory replaced whole, so a failure (a full disk
is one line naming the file) leaves the previous release as it was."""

from __future__ import annotations

from pathlib import Path

from stages.core.config.cli import run, start, timed
from stages.core.release import card, leaks, plots
from stages.core.release.files import LOG, encrypted_instructions, write_release
from stages.core.release.provenance import provenance
from stages.core.rows import records as release
from stages.core.storage.atomic import private_tempdir, staged_dir
from stages.core.storage.jsonl import sha256_file, write_json
from stages.core.storage.parquet import engine_roles


def main() -> None:
    params, name = start("package", __doc__, variant=True)
    variant, paths, spec = params.models[name], params.paths, params.release
    with (
        timed(LOG, f"package@{name}") as counts,
        # the plaintext instructions, private like their source: never in the system's temp dir
        private_tempdir(Path(paths.instructions).parent, f"package-{name}") as tmp,
        staged_dir(paths.release_of(name)) as out,  # all or nothing: the old release stays until done
    ):
        plain = Path(tmp) / "instructions.jsonl.gz"
        totals, drawn = write_release(params, name, out, plain)
        plain_sha256 = encrypted_instructions(params, name, plain, out, Path(tmp))
        files = {
            p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(out.iterdir())
            if p.name not in ("manifest.json", "README.md")
        }
        files[spec.instructions_file.format(subset=variant.subset)]["plaintext_sha256"] = plain_sha256
        metrics = release.release_metrics(totals)
        manifest = {
            "variant": name,
            "release_name": variant.release_name,
            "subset": variant.subset,
            "producers": release.producers(
                engine_roles(  # translate's: the translator of the rows the release lacks, if any
                    [
                        paths.translated_of(variant.subset),
                        paths.generated_of(name),
                        paths.scored_of(name),
                    ]
                )
            ),
            "provenance": provenance(params, name),
            "files": files,
            "metrics": metrics,
        }
        schema = release.public_schema(variant.generate.n_en > 0, variant.second_turn is not None)
        card.write_card(params, name, manifest, release.features(schema), out)
        write_json(manifest, out / "manifest.json")
        leaks.check_directory(params, name, out)  # the licence guard's content check: no release on failure
        write_json(metrics, paths.metrics_of(f"package@{name}"))
        plots.write_plots(drawn, metrics, Path(paths.plots_of(name)))
        counts.update(rows_in=totals["instructions"], rows_out=totals["instructions"])


if __name__ == "__main__":
    run(main)
