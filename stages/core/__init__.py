"""The library the stage entry modules share: params, row logic, engines, shards, storage, release."""
