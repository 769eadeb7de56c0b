"""LoRA serving: model weights and PEFT adapters in the pool, one worker per base model.

thawd's side (no torch): `host` (models, adapters and workers; importing runs the importer as a
child process), `api` (the /lora and OpenAI /v1 routes), `spec` (shapes and adapter checks).
The worker's side (torch): `importer` (Hugging Face safetensors, GGUF, PEFT into the tensor store),
`loader` (zero-copy views of a store, pinned chunked copies to a GPU), `model` (the Llama decoder
and its KV cache), `adapters` (device slots, SGMV/BGMV, merging, the reference), `engine`
(continuous batching), `worker` (the process, and `Worker` in-process).
"""
