"""QLoRA training (``edgepeft train``) and the bundled demo task.

Stable API for other modules:

- :func:`edgepeft.train.tasks.get_task` -> :class:`~edgepeft.train.tasks.Task`; ``task.examples("eval")``
  is a list of :class:`~edgepeft.train.chat.Example` (``prompt``, ``completion``).
- :func:`edgepeft.train.chat.render_prompt` (tokenizer, prompt) -> the exact text a runtime completes.
- :func:`edgepeft.evaluate.exact_match` (generate, examples, tokenizer) -> accuracy in [0, 1].
- :func:`edgepeft.train.adapter.load_adapter` / ``adapter_dir`` for RUN_DIR/adapter;
  :func:`edgepeft.train.manifest.read_manifest` / ``training_summary`` for its manifest.

Heavy libraries (torch, transformers, peft, trl, bitsandbytes) are imported inside functions only.
"""
