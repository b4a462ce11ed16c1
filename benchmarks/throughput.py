"""Evaluation throughput against lmms-eval's own HF model: documents per second of our `llava_ov_manager` without and
with a manager and of lmms-eval's `llava_hf`, on one checkpoint and the same lmms-eval requests.

    python -m benchmarks throughput --size small --documents 6 --rounds 7 --max-new-tokens 16 --threads 1
    llava-manager bench-throughput --size tiny

The checkpoint is made on the fly from the benchmark size's builders (random weights, no download) and saved to a
temporary directory; the manager model is the same checkpoint with a manager merged in. The documents are
`manager_tiny`'s (generated scenes); each model gets fresh lmms-eval `Instance`s with the same contexts and
`doc_to_visual`, so only the model classes differ. Rounds run the three models interleaved document by document (the
order rotating), for greedy generation of a fixed length and for multiple choice (one log-likelihood request per
choice); ratios are medians of per-round ratios. Answers are checked where the models are the same: our plugin
without a manager and `llava_hf` must generate the same strings, and our choice log-likelihoods must equal those of
one full forward of `llava_hf`'s own prompt + continuation through its model (`check_agreement`). Every model runs in
float32, on any device: the agreement check's tolerance is float32's.

Writes `<out>/throughput-<size>-<device>.{json,md}` and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from lmms_eval.api.instance import Instance
from tqdm import tqdm

from eval.model import LlavaOvManager
from eval.prompting import chat_prompt
from eval.tiny_data import generate_documents
from eval.tiny_task import doc_to_visual
from llava_integration import apply_manager, prepare_inputs
from llava_integration.patch import resolve_manager_config
from llava_integration.processing import image_mode_of
from llava_manager.cli import UsageError, run_main
from manager_plugin import MANAGER_TYPES, ManagerConfig
from manager_plugin.provenance import environment_provenance

from . import flops as flop_model
from .inputs import workload
from .machine import describe, device_option
from .measure import Variant
from .report import overhead_ratios, publish_results, spread
from .sizes import SIZES, build_config, build_model, build_processor

RESULTS = Path("runs/benchmarks")
TASK, SPLIT = "manager_tiny", "test"
# Random weights at the default scale (0.02) generate the same token for every document; this scale makes answers
# depend on the image and the question, so that comparing them means something. Cost does not depend on it.
INITIALIZER_RANGE = 0.2
# The three evaluated models; each reads its image mode from the checkpoint (aspect None).
SUBJECTS = {
    variant.name: variant
    for variant in (
        Variant("ours", "llava_ov_manager", None, False),
        Variant("ours_manager", "llava_ov_manager + manager", None, True),
        Variant("llava_hf", "lmms-eval llava_hf", None, False),
    )
}
PAIRS = {"ours": "llava_hf", "ours_manager": "ours"}  # each time over its reference's
KINDS = {"generate": "generation", "choice": "multiple choice"}
METRICS = [f"{kind}{clock}" for kind in KINDS for clock in ("_s", "_cpu_s")]
# Our two-pass cached scoring against one uncached forward, fp32: attention and matmul sums in another order differ
# by a few float32 ulps of the logits (|logit| < 30, ulp ~2e-6); a continuation of <= 4 tokens sums <= 4 log-softmax
# values, so 1e-4 bounds rounding with room while any real difference (a wrong position, token or prompt: >= 1e-2
# at these weight scales) stays far above it.
LOGLIKELIHOOD_TOLERANCE = 1e-4


class AgreementError(AssertionError):
    """Models that should give the same answers did not."""


@dataclass
class EvalSubject:
    """One evaluated model: its variant (name, label) and the lmms-eval model object."""

    variant: Variant
    model: object


def parse_args(argv: list[str] | None = None, prog: str = "python -m benchmarks throughput") -> argparse.Namespace:
    """The options, every one checked (a bad value is a `UsageError`) before anything is built."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i]; default: cuda if any")
    parser.add_argument("--attention", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2)")
    parser.add_argument("--documents", type=int, default=8, help="manager_tiny documents evaluated per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (after one warm-up round)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens generated per document")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--manager-type", default="static", help="the manager of the manager model")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and markdown")
    parser.add_argument("--tag", default=None, help="file name stem (default: throughput-<size>-<device type>)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("documents", "rounds", "max_new_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: expected a positive number")
    if args.manager_type not in MANAGER_TYPES:
        raise UsageError(f"--manager-type {args.manager_type!r}: expected one of {', '.join(MANAGER_TYPES)}")
    args.device = device_option(args.device)
    return args


def write_checkpoints(size_name: str, directory: Path, manager_type: str, seed: int, documents: list[dict]) -> dict:
    """The size's model saved as an HF checkpoint in `directory/base` and with a manager merged in `directory/manager`;
    returns the prefill FLOP floor of the manager on `documents` and the settings it read."""
    size = SIZES[size_name]
    processor = build_processor(size)
    config = build_config(size, processor)
    for part in (config, config.text_config, config.vision_config):
        part.initializer_range = INITIALIZER_RANGE
    model = build_model(config, "cpu", torch.float32, "sdpa", seed=seed)
    # Ids the tokenizer cannot decode (vocab_size > its length) would be greedy's picks as often as any, and decode to
    # nothing; zero rows give them logit 0, below the best of the hundreds of decodable tokens' random logits.
    with torch.no_grad():
        model.get_input_embeddings().weight[len(processor.tokenizer) :] = 0
        model.get_output_embeddings().weight[len(processor.tokenizer) :] = 0  # tied: the same rows
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    torch.manual_seed(seed)
    managed = apply_manager(copy.deepcopy(model), ManagerConfig(manager_type=manager_type))
    for name, checkpoint in (("base", model), ("manager", managed)):
        checkpoint.save_pretrained(directory / name)
        processor.save_pretrained(directory / name)
    manager_config = resolve_manager_config(config, ManagerConfig(manager_type=manager_type))
    return {
        "image_mode": image_mode_of(model),
        "manager_config": manager_config.to_dict(),
        "prefill_floor": prefill_floor(processor, config, model, manager_config, documents),
    }


def prefill_floor(processor, config, model, manager_config: ManagerConfig, documents: list[dict]) -> float:
    """FLOPs of the prompts' prefill forwards with the manager over without, summed over `documents` (the prompts
    our plugin builds, images included): the ratio the manager cannot go below at prefill. Decoding and the choices'
    continuation tokens cost the same with and without it, so a whole evaluation's floor lies between 1 and this."""
    aspect = image_mode_of(model)
    totals = {"with": 0, "without": 0}
    for document in documents:
        prompt = chat_prompt(processor, document["question"], 1, f"document {document['question_id']}")
        batch = prepare_inputs(processor, [prompt], [doc_to_visual(document)], aspect)
        work = workload(batch, config, aspect, model)
        for key, managed in (("with", manager_config), ("without", None)):
            totals[key] += sum(flop_model.forward_flops(config, work, managed, logits_tokens=1).values())
    return flop_model.manager_floor_ratio({"all": totals["with"]}, {"all": totals["without"]})


def peer_class() -> type:
    """lmms-eval's `llava_hf` model class.

    Its module imports `decord` (a video reader) at the top; where it is not installed, a placeholder that raises on
    use stands in while the module imports, and is removed at once: this benchmark gives it images only."""
    try:
        import decord  # noqa: F401
    except ImportError:

        def unavailable(*args, **kwargs):
            raise ImportError("decord is not installed: llava_hf cannot read videos here")

        sys.modules["decord"] = types.SimpleNamespace(VideoReader=unavailable, cpu=unavailable)
        try:
            from lmms_eval.models.simple.llava_hf import LlavaHf
        finally:
            del sys.modules["decord"]
        return LlavaHf
    from lmms_eval.models.simple.llava_hf import LlavaHf

    return LlavaHf


class TextOnlyCallTokenizes:
    """`llava_hf`'s processor, except that a call with text and no images tokenizes the text as transformers 4 did.

    `llava_hf.loglikelihood` measures its context's length by calling the processor on the prompt without its images;
    transformers 4 returned the tokens with each `<image>` placeholder unexpanded, transformers 5 raises "Found 1
    <image> tokens in the text but no images were passed". Everything else goes to the processor unchanged.
    """

    def __init__(self, processor) -> None:
        self._processor = processor

    def __call__(self, text=None, images=None, videos=None, **kwargs):
        if images is None and videos is None:
            return self._processor.tokenizer(text, **kwargs)
        return self._processor(text=text, images=images, videos=videos, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._processor, name)


def build_subjects(checkpoints: Path, device: torch.device, attention: str, documents: list[dict]) -> list:
    """The three lmms-eval models in float32, batch size 1 (the only one `llava_hf` generates with)."""
    dtype = "float32"
    ours = {"dtype": dtype, "device": str(device), "attn_implementation": attention, "batch_size": 1}
    peer = peer_class()(
        pretrained=str(checkpoints / "base"),
        device=str(device),
        device_map=str(device),  # its default "" is refused by transformers 5
        dtype=dtype,
        attn_implementation=attention,
        batch_size=1,
    )
    peer._image_processor = TextOnlyCallTokenizes(peer._image_processor)
    models = {
        "ours": LlavaOvManager(pretrained=str(checkpoints / "base"), **ours),
        "ours_manager": LlavaOvManager(pretrained=str(checkpoints / "manager"), **ours),
        "llava_hf": peer,
    }
    for model in models.values():
        model.task_dict = {TASK: {SPLIT: documents}}
    return [EvalSubject(SUBJECTS[name], model) for name, model in models.items()]


def generation_requests(documents: list[dict], max_new_tokens: int) -> list[Instance]:
    """One greedy `generate_until` request per document, with fresh generation settings (`llava_hf` edits them)."""
    settings = {"max_new_tokens": max_new_tokens, "temperature": 0, "do_sample": False}
    return [
        Instance(
            request_type="generate_until",
            arguments=(document["question"], dict(settings), doc_to_visual, index, TASK, SPLIT),
            idx=0,
            metadata={"task": TASK, "doc_id": index, "repeats": 1},
        )
        for index, document in enumerate(documents)
    ]


def choice_requests(documents: list[dict]) -> list[Instance]:
    """One `loglikelihood` request per choice of each document, as lmms-eval's multiple-choice tasks make them."""
    return [
        Instance(
            request_type="loglikelihood",
            arguments=(document["question"], choice, doc_to_visual, index, TASK, SPLIT),
            idx=slot,
            metadata={"task": TASK, "doc_id": index, "repeats": 1},
        )
        for index, document in enumerate(documents)
        for slot, choice in enumerate(document["choices"])
    ]


def _number(answer) -> float:
    """A log-likelihood answer's score: ours come as `GenerationResult(text=(nll, greedy))`, llava_hf's as tuples."""
    return float((answer.text if hasattr(answer, "text") else answer)[0])


def run_round(
    subjects: list[EvalSubject],
    documents: list[dict],
    max_new_tokens: int,
    answers: dict,
    shift: int = 0,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, dict[str, float]]:
    """One round: per document, its generation request then its choices' requests, by every model in turn (the
    order rotating by one per document, starting at `shift`). Returns each model's wall and CPU seconds summed over
    the documents, and keeps the answers.

    Interleaving per document, not per round as `measure.interleaved` does, keeps the three models' runs on one
    document seconds apart, so that a change of the shared machine's load reaches them alike."""
    times: dict[str, dict[str, float]] = {subject.variant.name: dict.fromkeys(METRICS, 0.0) for subject in subjects}
    for subject in subjects:
        answers[subject.variant.name] = {"generate": [], "choice": []}
    for index in range(len(documents)):
        start = (shift + index) % len(subjects)
        for subject in subjects[start:] + subjects[:start]:
            # Fresh requests for every call: llava_hf edits the generation settings it is given.
            generation = [r for r in generation_requests(documents, max_new_tokens) if r.args[3] == index]
            choices = [r for r in choice_requests(documents) if r.args[3] == index]
            for kind, call, requests in (
                ("generate", subject.model.generate_until, generation),
                ("choice", subject.model.loglikelihood, choices),
            ):
                sync()
                wall, cpu = time.perf_counter(), time.process_time()
                output = call(requests)
                sync()
                times[subject.variant.name][f"{kind}_s"] += time.perf_counter() - wall
                times[subject.variant.name][f"{kind}_cpu_s"] += time.process_time() - cpu
                answers[subject.variant.name][kind] += (
                    list(output) if kind == "generate" else [_number(answer) for answer in output]
                )
    return times


@torch.inference_mode()
def reference_choice_scores(peer, documents: list[dict]) -> dict[str, list[float]]:
    """Per choice request, from one full uncached forward of `llava_hf`'s own prompt + continuation (its chat
    template, processor and model): the continuation's summed log-likelihood, and what `llava_hf` returns for it,
    the mean negative log-likelihood of every token after its context's length counted with `<image>` unexpanded
    (so the tail of the image's tokens, the question and the template's `<|im_end|>\\n` are in it too)."""
    processor, tokenizer, model = peer._image_processor, peer.tokenizer, peer.model
    sums, peer_losses = [], []
    for request in choice_requests(documents):
        context, continuation, visual, doc_id = request.args[:4]
        images = visual(documents[doc_id])
        user = {"role": "user", "content": " ".join(["<image>"] * len(images)) + "\n" + context}
        prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template([user, {"role": "assistant", "content": continuation}], tokenize=False)
        inputs = processor(text=[whole], images=images, return_tensors="pt").to(model.device, model.dtype)
        prompt_length = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"].shape[1]
        target = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ids = inputs["input_ids"][0]
        if ids[prompt_length : prompt_length + len(target)].tolist() != target:
            raise AgreementError(f"document {doc_id} choice {continuation!r}: tokenized differently after the prompt")
        logprobs = torch.log_softmax(model(**inputs).logits[0, :-1].float(), dim=-1)
        token_logprobs = logprobs.gather(-1, ids[1:, None]).squeeze(-1)  # position t scores token t + 1
        sums.append(float(token_logprobs[prompt_length - 1 : prompt_length - 1 + len(target)].sum()))
        unexpanded = len(tokenizer(prompt)["input_ids"])
        peer_losses.append(float(-token_logprobs[unexpanded - 1 :].mean()))
    return {"loglikelihood": sums, "llava_hf_loss": peer_losses}


def check_agreement(answers: dict, reference: dict[str, list[float]], documents: list[dict]) -> dict:
    """Raise `AgreementError` where our plugin without a manager and `llava_hf` disagree; else a summary.

    Generation: the same strings. Multiple choice: ours (a negative log-likelihood) equals minus the reference's
    summed log-likelihood within `LOGLIKELIHOOD_TOLERANCE`, and `llava_hf`'s own scores equal the reference's
    account of what they measure (the same tolerance).
    """
    ours, peer = answers["ours"], answers["llava_hf"]
    if not any(ours["generate"]):
        raise AgreementError("every generated answer is empty: comparing them would prove nothing")
    for index, (mine, theirs) in enumerate(zip(ours["generate"], peer["generate"], strict=True)):
        if mine != theirs:
            raise AgreementError(f"document {index}: llava_ov_manager generated {mine!r}, llava_hf {theirs!r}")
    labels = [f"document {r.args[3]} choice {r.args[1]!r}" for r in choice_requests(documents)]
    checks = {
        "ours_vs_reference": ([-value for value in ours["choice"]], reference["loglikelihood"]),
        "llava_hf_vs_explained": (peer["choice"], reference["llava_hf_loss"]),
    }
    differences = {}
    for name, (measured, expected) in checks.items():
        gaps = [abs(a - b) for a, b in zip(measured, expected, strict=True)]
        worst = max(range(len(gaps)), key=gaps.__getitem__)
        if not gaps[worst] <= LOGLIKELIHOOD_TOLERANCE:  # NaN fails too
            raise AgreementError(
                f"{name}: {labels[worst]} scored {measured[worst]!r}, expected {expected[worst]!r} "
                f"(tolerance {LOGLIKELIHOOD_TOLERANCE})"
            )
        differences[name] = gaps[worst]
    picks = {
        name: [
            min(range(len(doc["choices"])), key=scores.__getitem__) for doc, scores in _per_document(values, documents)
        ]
        for name, values in (("ours", ours["choice"]), ("llava_hf", peer["choice"]))
    }
    return {
        "generation": {
            "documents": len(ours["generate"]),
            "identical": len(ours["generate"]),
            "distinct_answers": len(set(ours["generate"])),
            "answers": ours["generate"],
        },
        "choice": {
            "requests": len(labels),
            "tolerance": LOGLIKELIHOOD_TOLERANCE,
            "max_abs_difference": differences,
            "same_pick_as_llava_hf": sum(a == b for a, b in zip(picks["ours"], picks["llava_hf"])),
        },
    }


def _per_document(values: list[float], documents: list[dict]):
    """The flat per-choice `values` regrouped per document."""
    start = 0
    for document in documents:
        yield document, values[start : start + len(document["choices"])]
        start += len(document["choices"])


def run(args: argparse.Namespace, command: str) -> dict:
    """Build the checkpoints and models, measure interleaved rounds, check the answers; return the result record."""
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    documents = generate_documents(args.documents, seed=args.seed, preset="easy")
    machine = describe(device)
    with tempfile.TemporaryDirectory(prefix="throughput-checkpoints-") as scratch:
        built = write_checkpoints(args.size, Path(scratch), args.manager_type, args.seed, documents)
        subjects = build_subjects(Path(scratch), device, args.attention, documents)
    models = {subject.variant.name: subject.model for subject in subjects}
    answers: dict = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run_round(subjects, documents, args.max_new_tokens, answers, sync=sync)  # warm-up
    agreement = check_agreement(answers, reference_choice_scores(models["llava_hf"], documents), documents)
    timings: dict[str, dict[str, list[float]]] = {
        subject.variant.name: {m: [] for m in METRICS} for subject in subjects
    }
    for repeat in tqdm(range(args.rounds), desc="throughput rounds", leave=False):
        for name, values in run_round(subjects, documents, args.max_new_tokens, {}, repeat, sync).items():
            for metric, value in values.items():
                timings[name][metric].append(value)
    machine["load_average_after"] = describe(device)["load_average_1_5_15"]
    measurements = {}
    for name, values in timings.items():
        summary = {metric: {**spread(series), "values": series} for metric, series in values.items()}
        for kind in KINDS:
            seconds = summary[f"{kind}_s"]
            summary[f"{kind}_docs_per_s"] = {
                key: len(documents) / seconds[other]
                for key, other in (("min", "max"), ("median", "median"), ("max", "min"))
            }
        measurements[name] = summary
    return {
        "benchmark": "evaluation throughput",
        "command": command,
        "size": args.size,
        "machine": machine,
        "provenance": environment_provenance(),
        "settings": {
            "dtype": "float32",
            "attention": args.attention,
            "batch_size": 1,
            "documents": len(documents),
            "choices": sum(len(document["choices"]) for document in documents),
            "rounds": args.rounds,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
            "task": f"{TASK} documents (preset easy), one image each",
            "image_mode": built["image_mode"],
            "manager_config": built["manager_config"],
        },
        "subjects": {name: variant.label for name, variant in SUBJECTS.items()},
        "floor": {"prefill": built["prefill_floor"]},
        "agreement": agreement,
        "measurements": measurements,
        "ratios": overhead_ratios(timings, PAIRS, METRICS),
    }


def markdown_table(result: dict) -> str:
    """Documents per second per model and kind, and the interleaved time ratios, as markdown."""
    settings, machine, measured = result["settings"], result["machine"], result["measurements"]
    agreement = result["agreement"]
    lines = [
        f"### Evaluation throughput, {result['size']} on {machine['device_name']}",
        "",
        (
            f"{settings['dtype']}, {settings['attention']} attention, batch size {settings['batch_size']}, "
            f"{settings['documents']} {settings['task']} ({settings['image_mode']}), {settings['choices']} choices, "
            f"greedy {settings['max_new_tokens']} new tokens; {settings['rounds']} interleaved rounds after a warm-up, "
            f"{machine['torch_threads']} torch threads, load average {machine['load_average_1_5_15']} before and "
            f"{machine.get('load_average_after')} after."
        ),
        "",
        "| model | generation docs/s (min/med/max) | multiple choice docs/s (min/med/max) |",
        "|---|---|---|",
    ]
    for name, label in result["subjects"].items():
        cells = [_spread_text(measured[name][f"{kind}_docs_per_s"], 2) for kind in KINDS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        (
            "| time ratio (median of per-round ratios; min-max) | generation wall | generation CPU | multiple choice wall "
            "| multiple choice CPU | prefill FLOP floor |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for variant, base in PAIRS.items():
        ratios = result["ratios"][variant]
        cells = [f"x{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})" for r in (ratios[m] for m in METRICS)]
        floor = f"{result['floor']['prefill']:.4f}" if base == "ours" else "1 (same model)"
        lines.append(
            f"| {result['subjects'][variant]} / {result['subjects'][base]} | " + " | ".join(cells) + f" | {floor} |"
        )
    choice = agreement["choice"]
    lines += [
        "",
        (
            f"Agreement (llava_ov_manager without a manager vs llava_hf, same checkpoint): "
            f"{agreement['generation']['identical']}/{agreement['generation']['documents']} generations identical; "
            f"choice log-likelihoods equal a full uncached forward of llava_hf's prompt + continuation within "
            f"{choice['max_abs_difference']['ours_vs_reference']:.1e} (tolerance {choice['tolerance']:.0e}); llava_hf's "
            f"own scores are the mean NLL of every token from its context's length counted with `<image>` unexpanded on "
            f"(within {choice['max_abs_difference']['llava_hf_vs_explained']:.1e}); its picks equal ours on "
            f"{choice['same_pick_as_llava_hf']}/{settings['documents']} documents."
        ),
        "",
        f"Command: `{result['command']}`",
    ]
    return "\n".join(lines) + "\n"


def _spread_text(values: dict[str, float], digits: int) -> str:
    return "/".join(f"{values[key]:.{digits}f}" for key in ("min", "median", "max"))


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks throughput") -> dict:
    """Measure as the command line says; write and print the results."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv, prog)
    result = run(args, " ".join([*prog.split(), *map(shlex.quote, argv)]))
    stem = args.tag or f"throughput-{args.size}-{result['machine']['device'].split(':')[0]}"
    publish_results(args.out, stem, result, markdown_table(result))
    return result


if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m benchmarks.throughput"))
