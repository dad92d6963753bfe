"""Configuration: params.yaml typed and validated, the command line of a stage, errors for people."""
