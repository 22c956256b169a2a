"""Commissioning: the generated reference, config samples and schema, the dry run, browse and scan."""
