"""Losses as pure functions of tensors (no modules, no collectives): ``stego`` (SPEC §3), ``ds2dl`` (SPEC §4)."""
