"""A release's card, plot tables, the published release files and the comparison with them, the
merged file. Imports every layer below; nothing imports it but the stages."""
