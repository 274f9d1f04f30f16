"""The PyTorch reference as one more runtime: fp32 transformers (+ PEFT adapters) behind the
:class:`~edgepeft.runtimes.base.Runtime` calls the measurements use.

So the reference row of a benchmark is scored by the very functions that score every artifact
(``perplexity``, ``task_accuracy``: same text, same examples, same greedy loop), and top-1
agreement compares each artifact with the argmax this class produces.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class TorchReference:
    name = "pytorch"
    load_ms = 0.0

    def __init__(self, base_spec: str, adapters: dict[str, str] | None = None):
        import torch

        from edgepeft.models import resolve_base

        self._torch = torch
        base = resolve_base(base_spec)
        self.tokenizer = base.load_tokenizer()
        model = base.load_model(torch.float32).eval()
        from edgepeft.train.adapter import adapter_dir, check_base

        # RUN_DIR or RUN_DIR/adapter, as everywhere; refused when trained on another base
        self.adapters = {name: str(adapter_dir(folder)) for name, folder in (adapters or {}).items()}
        for folder in self.adapters.values():
            check_base(Path(folder), base)
        if self.adapters:
            from peft import PeftModel

            first, *rest = self.adapters.items()
            model = PeftModel.from_pretrained(model, first[1], adapter_name=first[0]).eval()
            for name, folder in rest:
                model.load_adapter(folder, adapter_name=name)
        self.model = model
        self.set_adapter(None)

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=False)

    def set_adapter(self, name: str | None) -> None:
        if self.adapters:
            if name is None:
                self.model.base_model.disable_adapter_layers()
            else:
                self.model.base_model.enable_adapter_layers()
                self.model.set_adapter(name)
        elif name is not None:
            from edgepeft.runtimes.base import check_adapter_name

            check_adapter_name(self.name, self.adapters, name)
        self.reset()

    def reset(self) -> None:
        self._past, self._logits = None, None

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> None:
        torch = self._torch
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([list(tokens)]), cache=self._past, use_cache=True)
        self._past = out.cache  # transformers 5: "cache" (past_key_values is its deprecated name)
        logits = out.logits[0]
        self._logits = (logits if all_logits else logits[-1:]).float().numpy()

    def decode(self, n: int, tokens: Sequence[int] | None = None) -> list[int]:
        fed = []
        for i in range(n):
            t = int(tokens[i]) if tokens is not None else int(self._logits[-1].argmax())
            self.prefill([t])
            fed.append(t)
        return fed

    def logits(self):
        return self._logits

    def close(self) -> None:
        self.model = None
