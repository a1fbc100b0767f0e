"""Language-model evaluation: held-out loss, perplexity and bits per byte, and lm-evaluation-harness tasks.

Bits per byte divides the summed negative log-likelihood (in bits) by the UTF-8 bytes of the predicted text, so runs
with different tokenizers (our 4k BPE, Phi-2's 51k vocabulary, litgpt's dense baseline) compare fairly.

`LitLM` is an lm-evaluation-harness `LM` over any checkpoint `litgpt_mm.model.load_model` reads (our MoE model,
litgpt's dense layout): litgpt's `convert_and_evaluate` goes through a Hugging Face Phi conversion that cannot carry
the experts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from litgpt_mm.eval.metrics import Result, bootstrap_ci


def text_windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Non-overlapping windows of `seq_len + 1` tokens (inputs and targets overlap by one)."""
    n = (ids.numel() - 1) // seq_len
    return [ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]


def shard_windows(shard_dir: Path, seq_len: int, max_blocks: int | None) -> list[torch.Tensor]:
    """Up to `max_blocks` blocks of prepared token shards, spread evenly over the split (all when None)."""
    from litgpt_mm.data.tokens import TokenBlocks

    blocks = TokenBlocks(shard_dir, seq_len + 1)
    n = len(blocks)
    picks = (
        range(n)
        if not max_blocks or max_blocks >= n
        else [round(i * (n - 1) / (max_blocks - 1)) for i in range(max_blocks)]
    )
    return [blocks[i] for i in sorted(set(picks))]


@torch.no_grad()
def bits_per_byte(model, tokenizer, windows: Sequence[torch.Tensor], batch_size: int = 8, seed: int = 0) -> list:
    """Loss (nats/token), perplexity and bits per byte over `windows`, each with a bootstrap interval over windows.

    Returns `Result`s for `loss`, `perplexity` and `bits_per_byte`, plus the token and byte counts.
    """
    device = next(model.parameters()).device
    nll, tokens, nbytes = [], [], []
    for start in tqdm(range(0, len(windows), batch_size), desc="held-out loss", leave=False):
        batch = torch.stack(list(windows[start : start + batch_size])).to(device)
        logits = model(batch[:, :-1])
        losses = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        nll += losses.view(batch.size(0), -1).sum(1).tolist()
        for row in batch[:, 1:]:
            tokens.append(row.numel())
            nbytes.append(len(tokenizer.decode(row.cpu()).encode("utf-8")))
    per = list(zip(nll, tokens, nbytes, strict=True))

    def loss(rows):
        return sum(r[0] for r in rows) / sum(r[1] for r in rows)

    def bpb(rows):
        return sum(r[0] for r in rows) / math.log(2) / sum(r[2] for r in rows)

    lo, hi = bootstrap_ci(per, loss, seed=seed) if len(per) > 1 else (None, None)
    blo, bhi = bootstrap_ci(per, bpb, seed=seed) if len(per) > 1 else (None, None)
    value = loss(per)
    return [
        Result("loss", value, lo, hi, len(per)),
        Result("perplexity", math.exp(value), math.exp(lo) if lo else None, math.exp(hi) if hi else None, len(per)),
        Result("bits_per_byte", bpb(per), blo, bhi, len(per)),
        Result("tokens", float(sum(tokens))),
        Result("bytes", float(sum(nbytes))),
    ]


def _harness_lm_class():
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class LitLM(LM):
        """lm-evaluation-harness model over our `GPT` and litgpt tokenizer (greedy generation, one request at a time
        for generation, batched scoring of continuations)."""

        def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None) -> None:
            super().__init__()
            self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
            self.max_length = max_length or model.config.block_size
            self.device = next(model.parameters()).device
            self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id

        def _encode(self, text: str) -> list[int]:
            return self.tokenizer.encode(text, bos=False, eos=False).tolist()

        def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            # a trailing space belongs to the continuation (lm-eval's HF model does the same)
            n = len(context) - len(context.rstrip())
            context, continuation = context[: len(context) - n], context[len(context) - n :] + continuation
            whole, ctx = self._encode(context + continuation), self._encode(context)
            if whole[: len(ctx)] != ctx:  # the tokenizer merged across the boundary: encode the parts apart
                return ctx or [self.prefix_id], self._encode(continuation)
            return ctx or [self.prefix_id], whole[len(ctx) :]

        @torch.no_grad()
        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            out = []
            for start in tqdm(range(0, len(pairs), self.batch_size), desc="lm-eval loglikelihood", leave=False):
                chunk = pairs[start : start + self.batch_size]
                rows = [(ctx + cont)[-(self.max_length + 1) :] for ctx, cont in chunk]
                width = max(len(r) for r in rows) - 1
                x = torch.zeros(len(rows), width, dtype=torch.long)
                for i, r in enumerate(rows):
                    x[i, : len(r) - 1] = torch.tensor(r[:-1])
                logp = self.model(x.to(self.device)).float().log_softmax(-1).cpu()
                for i, (r, (_, cont)) in enumerate(zip(rows, chunk, strict=True)):
                    n, end = len(cont), len(r) - 1
                    pred = logp[i, end - n : end]
                    target = torch.tensor(r[-n:])
                    total = pred.gather(-1, target[:, None]).sum().item()
                    out.append((total, bool((pred.argmax(-1) == target).all())))
            return out

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            return self._score([self._split(*req.args) for req in requests])

        def loglikelihood_rolling(self, requests) -> list[float]:
            results = []
            for req in requests:
                windows = get_rolling_token_windows(
                    token_list=self._encode(req.args[0]),
                    prefix_token=self.prefix_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
                pairs = [make_disjoint_window(w) for w in windows]
                results.append(sum(score for score, _ in self._score(pairs)))
            return results

        @torch.no_grad()
        def generate_until(self, requests) -> list[str]:
            from litgpt.generate.base import generate

            out = []
            for req in tqdm(requests, desc="lm-eval generate", leave=False):
                context, kwargs = req.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.get("max_gen_toks", 64))
                ids = torch.tensor(self._encode(context)[-(self.max_length - max_new) :] or [self.prefix_id])
                self.model.set_kv_cache(batch_size=1, max_seq_length=ids.numel() + max_new, device=self.device)
                try:
                    new = generate(
                        self.model,
                        ids.to(self.device),
                        ids.numel() + max_new,
                        temperature=0.0,
                        eos_id=self.tokenizer.eos_id,
                    )[ids.numel() :]
                finally:
                    self.model.clear_kv_cache()
                text = self.tokenizer.decode(new[new != self.tokenizer.eos_id])
                cut = min([text.index(s) for s in until if s and s in text], default=len(text))
                out.append(text[:cut])
            return out

    return LitLM


def harness(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: Path | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> dict:
    """`lm_eval.simple_evaluate` with our model: returns lm-eval's results dict (`results[task][metric]`)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = _harness_lm_class()(model, tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    return simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=manager,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=1000,
        log_samples=False,
    )


def iter_text_files(paths: Sequence[Path]) -> Iterator[tuple[Path, str]]:
    """Read raw text files, naming a missing or undecodable one."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} does not exist")
        try:
            yield path, path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err}): convert it or pass prepared shards") from None
