"""On-disk formats, one owner each: manifests, training checkpoints, the stage-2 base, exports, hub sources, streamed safetensors, loading any artefact."""
