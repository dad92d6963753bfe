#!/usr/bin/env bash
# Prints the passphrase of this sample's encrypted instructions: the hex sha256 of the first
# LMSYS-Chat-1M shard. Written for lmsys-chat-1m-synth's bundled sample (scripts/make_sample.py);
# it stands in for the published release's script of the same name and is run the same way
# (decrypt.key.method: script).
# Usage: bash compute_decryption_key_from_lmsys-chat-1m.sh <lmsys-chat-1m directory, as on the Hub>
set -euo pipefail
root="${1:?usage: $0 <lmsys-chat-1m directory>}"
shopt -s nullglob
shards=("$root"/data/train-00000-of-00002-*.parquet)
if [ "${#shards[@]}" -ne 1 ]; then
  echo "expected one file $root/data/train-00000-of-00002-*.parquet, found ${#shards[@]}" >&2
  exit 1
fi
if command -v sha256sum >/dev/null; then
  sha256sum "${shards[0]}" | cut -d ' ' -f 1
else
  shasum -a 256 "${shards[0]}" | cut -d ' ' -f 1  # macOS
fi
