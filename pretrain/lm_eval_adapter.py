"""An lm-evaluation-harness model over our checkpoints or Hugging Face exports.

Registered as ``pretrain-pipeline``; either backend is picked by its model arg:

    python -m pretrain.lm_eval_adapter run --model pretrain-pipeline \\
        --model_args run_dir=runs/smoke --tasks lambada_openai
    python -m pretrain.lm_eval_adapter run --model pretrain-pipeline \\
        --model_args pretrained=runs/smoke/export/hf --tasks my_task --include_path tasks/

(``python -m lm_eval`` does not know the name; this entry point registers it, then hands over to
lm-eval's own command line.) Every request is scored as a document of its own: it starts after an
EOS token, as each training document does, and is cut from the left to the model's context.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window


def _load_run(run_dir: str, tag: str | None):
    """Our GPT from a run directory (its config.yaml + the consolidated checkpoint) and its SentencePiece."""
    import sentencepiece as spm

    from pretrain.evaluate import load_model
    from pretrain_pipeline.artifacts import RunPaths
    from pretrain_pipeline.config import load_config

    paths = RunPaths(Path(run_dir))
    if not paths.config.exists():
        raise FileNotFoundError(f"{paths.config} not found: run_dir must be a trained run directory")
    model, _, manifest = load_model(load_config(paths.config), paths, tag)
    return _ours(model, spm.SentencePieceProcessor(model_file=str(manifest.tokenizer_path)), manifest.eos_id)


def _ours(model, sp, eos_id: int):
    return (lambda ids: model(ids)[0]), model, sp.encode, sp.decode, eos_id, model.block_size


def _load_export(hf_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    # A literal "</s>" in a task's text is text, as SentencePiece reads it (also for exports
    # written before tokenizer_config.json carried split_special_tokens).
    encode = lambda text: tok(text, add_special_tokens=False, split_special_tokens=True).input_ids  # noqa: E731
    decode = lambda ids: tok.decode(ids)  # noqa: E731
    logits = lambda ids: model(input_ids=ids, use_cache=False).logits  # noqa: E731
    return logits, model, encode, decode, model.config.eos_token_id, model.config.max_position_embeddings


@register_model("pretrain-pipeline")
class PretrainPipelineLM(LM):
    def __init__(
        self,
        run_dir: str | None = None,
        pretrained: str | None = None,
        tag: str | None = None,
        batch_size: int | str = 8,
        device: str | None = None,
        _loaded: tuple | None = None,  # from_model's
        **_ignored: Any,  # lm-eval passes max_batch_size etc. to every model
    ):
        super().__init__()
        if _loaded is not None:
            loaded = _loaded
        elif (run_dir is None) == (pretrained is None):
            raise ValueError("give exactly one of run_dir=<trained run dir> or pretrained=<HF export dir>")
        elif run_dir is not None:
            loaded = _load_run(run_dir, tag)
        else:
            loaded = _load_export(pretrained)
        self._logits_fn, self.model, self.tok_encode, self.tok_decode, self.eot_token_id, self.max_length = loaded
        self._device = torch.device(device or "cpu")
        self.model.to(self._device)
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)

    @classmethod
    def from_model(cls, model, sp, eos_id: int, batch_size: int = 8, device: str | None = None) -> "PretrainPipelineLM":
        """The adapter over a GPT already in memory (the evaluate stage's), without loading it again."""
        return cls(_loaded=_ours(model, sp, eos_id), batch_size=batch_size, device=device)

    @property
    def device(self) -> torch.device:
        return self._device

    # -- scoring -----------------------------------------------------------------------------

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context, continuation) token lists -> (sum log p(continuation), continuation is greedy)."""
        out = []
        for start in range(0, len(pairs), self.batch_size):
            batch = []
            for ctx, cont in pairs[start : start + self.batch_size]:
                cont = cont[-self.max_length :]
                full = ([self.eot_token_id] + ctx + cont)[-(self.max_length + 1) :]
                batch.append((full[:-1], cont))
            width = max(len(x) for x, _ in batch)
            # Right padding: a causal model's logits at real positions do not see the padding.
            ids = torch.tensor([x + [self.eot_token_id] * (width - len(x)) for x, _ in batch], device=self.device)
            logprobs = F.log_softmax(self._logits_fn(ids).float(), dim=-1)
            for row, (x, cont) in enumerate(batch):
                span = logprobs[row, len(x) - len(cont) : len(x)]
                target = torch.tensor(cont, device=self.device)
                ll = float(span.gather(-1, target[:, None]).sum())
                out.append((ll, bool((span.argmax(-1) == target).all())))
        return out

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Trailing spaces belong to the continuation: SentencePiece glues a space to the next word.
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context) if context else []
        return ctx, whole[len(ctx) :]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._score([self._encode_pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for r in requests:
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    self.tok_encode(r.args[0]), prefix_token=self.eot_token_id, max_seq_len=self.max_length, context_len=1
                )
            ]
            # _score prepends EOS itself, so drop the prefix token the first window carries.
            pairs = [(ctx[1:] if i == 0 else ctx, pred) for i, (ctx, pred) in enumerate(windows)]
            results.append(sum(ll for ll, _ in self._score(pairs)))
        return results

    # -- generation --------------------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            generator = torch.Generator(device=self.device).manual_seed(int(kwargs.get("seed", 0)))
            ids = [self.eot_token_id] + self.tok_encode(context)
            new: list[int] = []
            text = ""
            for _ in range(max_new):
                window = torch.tensor([(ids + new)[-self.max_length :]], device=self.device)
                logits = self._logits_fn(window)[0, -1].float()
                if temperature > 0:
                    nxt = int(torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator))
                else:
                    nxt = int(logits.argmax())
                if nxt == self.eot_token_id:
                    break
                new.append(nxt)
                text = self.tok_decode(new)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
        return results


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
