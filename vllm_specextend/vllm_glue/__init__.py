"""Everything that touches vLLM internals. When vLLM changes, this folder
changes; `registry.PATCHES` lists each replaced class attribute, and
`patching.replace_on_instance` records every change to an object vLLM
built (`patching.applied_patches()` lists both). The package imports
nothing itself, so that `patching` and `engine_config` load on a vLLM the
other modules cannot import."""
