"""Every combination of train.py's settings either works, checked against an independent fact, or is refused when the
settings are read, in one line that names both settings in conflict.

The matrix (tests/combinations_cells.py): objective x peft_method x LoRA variant x quantize x packing (sft) x
dpo_reference (dpo) x merge_on_save x loss path x parallel (GRPO's settings at their defaults: grpo_beta=0.04). Its
whole product goes through the settings check; the accepted cells run on tiny models against a fact that does not
come from the code under test:
    the chunked loss equals the plain loss, gradients included       every accepted (objective, method, variant,
                                                                     quantize, packing)
    DPO's reference is the starting model; a fresh adapter's loss    every accepted dpo (method, variant, quantize,
    is ln 2                                                          reference), and through train.py for a few
    GRPO's reference is the starting model; a fresh adapter's loss    every accepted grpo (method, variant, quantize)
    is -sum_i A_i L_i / sum_i L_i (ratio 1, k3 0)
    PEFT gives the logits of ours for the saved adapter              every method and variant that saves one
    transformers gives the unmerged logits for the merged export     every method and variant that merges
    two processes take the steps of one (ddp, fsdp on gloo)          a few, marked slow
"""
import contextlib
import copy
import json
import math
import shutil
import warnings

import pytest
import torch

import adapters
import objectives.dpo as dpo
from combinations_cells import (BLOCK, PROMPT_METHODS, VARIANTS, Cell, base_settings, every_cell, run_settings,
                                train_defaults)
from objectives import OBJECTIVES, Run
from test_dpo import make_pairs, write_dpo_dir
from test_grpo import make_prompts, write_prompt_dir
from test_sft_train import make_examples, write_sft_dir
from test_train import read_log, run_torchrun, run_train, write_shards
from tools.errors import UserError
from training.checkpoint import fingerprint, load_base
from training.validate import resolve_defaults, validate_config

# ---- 1. the whole product through the settings check ------------------------------------------------------------


def setting(cell, key):
    """'key=value' as a refusal names it."""
    value = {**cell.given(), "objective": cell.objective}.get(key)
    return f"{key}={value!r}"


def variant_setting(cell):
    return next(f"{k}={v!r}" for k, v in VARIANTS[cell.variant]("gpt2").items())


# when(cell) -> the two settings a refusal must name; a cell is accepted when no line applies
REFUSALS = [
    # a LoRA setting given with another method does nothing (the ownership rule)
    (lambda c: c.variant != "none" and c.method != "lora", lambda c: (variant_setting(c), setting(c, "peft_method"))),
    # only LoRA trains on a quantized base, and PiSSA's SVD and residual need the full-precision weight
    (lambda c: c.quantize and c.method != "lora", lambda c: (setting(c, "quantize"), setting(c, "peft_method"))),
    (lambda c: c.quantize and c.pissa, lambda c: (setting(c, "quantize"), "lora_init='pissa'")),
    # fsdp shards full fine-tuning and LoRA, not PiSSA's residual base; DPO does not run under it
    (lambda c: c.parallel == "fsdp" and c.objective == "dpo", lambda c: ("objective='dpo'", "parallel='fsdp'")),
    (lambda c: c.parallel == "fsdp" and c.method not in ("full", "lora"),
     lambda c: ("parallel='fsdp'", setting(c, "peft_method"))),
    (lambda c: c.parallel == "fsdp" and c.pissa, lambda c: ("parallel='fsdp'", "lora_init='pissa'")),
    # DPO: a frozen copy is for full fine-tuning; the adapter switched off must be the starting model
    (lambda c: c.reference == "copy" and c.method != "full", lambda c: ("dpo_reference='copy'", setting(c, "peft_method"))),
    (lambda c: c.reference == "adapter_off" and c.method == "full",
     lambda c: ("dpo_reference='adapter_off'", "peft_method='full'")),
    (lambda c: c.reference == "adapter_off" and c.method == "lora" and c.variant in ("pissa", "modules_to_save"),
     lambda c: ("dpo_reference='adapter_off'", variant_setting(c))),
    # packed SFT rows cannot carry the learned positions of the prompt-based methods
    (lambda c: c.packing and c.method in PROMPT_METHODS, lambda c: ("packing=True", setting(c, "peft_method"))),
    # GRPO: its KL's reference (grpo_beta=0.04 by default) is the adapter switched off, or a copy for full fine-tuning
    (lambda c: c.parallel == "fsdp" and c.objective == "grpo", lambda c: ("objective='grpo'", "parallel='fsdp'")),
    (lambda c: c.objective == "grpo" and c.method == "lora" and c.variant in ("pissa", "modules_to_save"),
     lambda c: ("grpo_beta=0.04", variant_setting(c))),
    # merge_on_save folds an adapter into the weights: LoRA's and AdaLoRA's
    (lambda c: c.merge and c.method not in ("lora", "adalora"), lambda c: ("merge_on_save=True", setting(c, "peft_method"))),
]
CELLS, ACCEPTED = 6912, 850  # the product's size, and the cells no line of REFUSALS applies to


def conflicts(cell):
    return [names(cell) for when, names in REFUSALS if when(cell)]


def settings_check(cell):
    """None if train.py accepts the cell's settings, else its refusal."""
    given = cell.given()
    config = resolve_defaults({**train_defaults(), **given})
    try:
        validate_config(config, given)
    except ValueError as e:
        return e
    return None


def test_every_cell_is_accepted_or_refused_in_one_line_naming_both_settings_that_conflict():
    counts, wrong = {"cells": 0, "accepted": 0, "refused": 0}, []
    for cell in every_cell():
        counts["cells"] += 1
        expected = conflicts(cell)
        counts["refused" if expected else "accepted"] += 1
        refusal = settings_check(cell)
        if refusal is None:
            if expected:
                wrong.append(f"{cell.id}: accepted, but {' and '.join(expected[0])} conflict")
            continue
        message = str(refusal)
        if not expected:
            wrong.append(f"{cell.id}: refused, but no rule says so: {message}")
        elif not isinstance(refusal, UserError) or "\n" in message:
            wrong.append(f"{cell.id}: not a one-line UserError: {type(refusal).__name__}: {message!r}")
        elif not any(a in message and b in message for a, b in expected):
            wrong.append(f"{cell.id}: the refusal does not name {' and '.join(expected[0])}: {message}")
    print(f"settings matrix: {counts}")
    assert not wrong, f"{len(wrong)} cells:\n" + "\n".join(wrong[:40])
    assert (counts["cells"], counts["accepted"]) == (CELLS, ACCEPTED)


@pytest.mark.parametrize("method,variant,resolved", [
    ("full", "none", "precompute"), ("lora", "none", "adapter_off"), ("lora", "dora", "adapter_off"),
    ("lora", "pissa", "precompute"), ("lora", "rslora", "adapter_off"), ("lora", "modules_to_save", "precompute"),
    ("lora", "fused", "adapter_off"), ("adalora", "none", "adapter_off"), ("prompt", "none", "adapter_off"),
    ("ptuning", "none", "adapter_off"), ("prefix", "none", "adapter_off")])
def test_dpo_reference_auto_is_the_adapter_switched_off_where_that_is_the_starting_model(method, variant, resolved):
    given = Cell("dpo", method, variant).given()
    assert resolve_defaults({**train_defaults(), **given})["dpo_reference"] == resolved


# ---- 2. accepted cells on tiny models, one process ----------------------------------------------------------------
def one_process_cells(objective_axes):
    """The accepted cells of one process with the default loss path and no merge, one per distinct combination
    of the axes that objective_axes(cell) keeps."""
    seen = {}
    for cell in every_cell():
        if cell.merge or cell.chunk is not None or cell.parallel is not None or conflicts(cell):
            continue
        seen.setdefault(objective_axes(cell), cell)
    return list(seen.values())


# DPO's loss reads the full logits (sequence log-probs), so for it the fact is that loss_chunk_size changes nothing;
# its own facts are the reference's (DPO_CELLS)
RUN_CELLS = one_process_cells(lambda c: (c.objective, c.method, c.variant, c.quantize, c.packing))
RUN_CELLS = [c for c in RUN_CELLS if c.reference in (None, "auto") and c.objective != "grpo"]  # GRPO: GRPO_CELLS
DPO_CELLS = [c for c in one_process_cells(lambda c: (c.objective, c.method, c.variant, c.quantize, c.reference))
             if c.objective == "dpo" and c.reference != "auto"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread computes them as fast, and does not wait on cores that other processes hold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random base of each family (a Hugging Face folder), loaded in full precision and in nf4, and a data
    folder of each objective."""
    from model import model_class
    root = tmp_path_factory.mktemp("combinations")
    folders, bases = {}, {}
    for family in ("gpt2", "llama"):
        torch.manual_seed(0)
        cls = model_class(family)
        cls(cls.scratch_config({**train_defaults(), **base_settings(family)})).save_pretrained(root / family)
        folders[family] = root / family
        for quantize in ("", "nf4"):
            bases[family, quantize] = load_base(str(root / family), quantize=quantize, dropout=0.0)
    write_shards(root / "lm", n_train=4_000, n_val=1_000)
    write_sft_dir(root / "sft", make_examples(16, 0, max_answer=8, max_len=BLOCK + 1),
                  make_examples(4, 1, max_answer=8, max_len=BLOCK + 1))
    write_dpo_dir(root / "dpo", make_pairs(8, 0), make_pairs(4, 1))
    write_prompt_dir(root / "grpo", make_prompts(8, 0), make_prompts(4, 1))
    for objective in ("sft", "dpo", "grpo"):  # prepare_sft.py's header has a 'splits' entry; an empty one lists no shards,
        header_path = root / objective / "sft.json"  # and the loaders read every {split}_*.npz of the folder
        header = json.loads(header_path.read_text())
        header.setdefault("splits", {})
        header_path.write_text(json.dumps(header))
    return {"root": root, "folders": folders, "bases": bases}


def build(cell, family, world, tmp_path):
    """The cell as train.py builds it: settings, the loaded base (kept as the starting model), the method applied,
    the objective started. The data folder is the cell's own (DPO writes its precomputed reference there)."""
    data_dir = tmp_path / "data"
    shutil.copytree(world["root"] / cell.objective, data_dir)
    config, _ = run_settings(cell, family, world["folders"][family], data_dir)
    model = copy.deepcopy(world["bases"][family, cell.quantize])
    base_fingerprint = fingerprint(model)
    start = copy.deepcopy(model).eval()
    adapters.apply(model, cell.method, config)
    task = OBJECTIVES[cell.objective](Run(config, "cpu", contextlib.nullcontext()))
    loaders = task.make_loaders()
    task.check(model, loaders)
    task.start(model, base=str(world["folders"][family]), base_fingerprint=base_fingerprint, resuming=False,
               loaders=loaders, out_dir=str(tmp_path / "out"))
    model.train()
    return config, model, start, task, loaders


def loss_and_grads(model, task, batch, chunk):
    """The objective's mean loss over the batch's items, and the gradient of every trainable tensor."""
    model.loss_chunk_size = chunk
    model.zero_grad(set_to_none=True)
    loss_sum, _ = task.loss(model, batch)
    loss = loss_sum / task.count(batch)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_close_to_scale(actual, expected, rel=1e-5, what=""):
    """|actual - expected| <= rel x the largest |expected| (+ a floor for an all-zero expected)."""
    error = (actual - expected).abs().max().item()
    assert error <= rel * expected.abs().max().item() + 1e-9, f"{what}: off by {error:.3g}"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("cell", RUN_CELLS, ids=lambda c: c.id)
def test_the_chunked_loss_equals_the_plain_loss_gradients_included(cell, family, world, tmp_path):
    from model.chunked_loss import DEFAULT_CHUNK_SIZE
    _, model, _, task, loaders = build(cell, family, world, tmp_path)
    batch = loaders[0].next_batch()
    plain_loss, plain = loss_and_grads(model, task, batch, 0)
    assert all(g is not None for g in plain.values()) and any(g.abs().sum() > 0 for g in plain.values())
    loss, grads = loss_and_grads(model, task, batch, DEFAULT_CHUNK_SIZE)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain.keys()
    for name, grad in grads.items():
        assert_close_to_scale(grad, plain[name], what=name)


@pytest.mark.parametrize("cell", [pytest.param(c, id=c.id) for c in DPO_CELLS])
def test_the_dpo_reference_is_the_starting_model_and_a_fresh_adapter_starts_at_ln_2(cell, world, tmp_path):
    config, model, start, task, loaders = build(cell, "gpt2", world, tmp_path)
    x, y, stored = batch = loaders[0].next_batch()
    with torch.no_grad():
        reference = dpo.reference_logps(x, y, config["dpo_reference"], model, task.ref_model, stored)
        expected = dpo.sequence_logps(start(x)[0], y)
        loss_sum, _ = task.loss(model, batch)
    assert (reference - expected).abs().max().item() < 1e-5
    if cell.method in ("full", "lora", "adalora"):  # their fresh state is the starting model: the margin is 0
        assert (loss_sum / task.count(batch)).item() == pytest.approx(math.log(2), abs=1e-6)


# GRPO reads the logits of its sampled completions (never the chunked loss); its facts are the reference's and step 0's
GRPO_CELLS = [c for c in one_process_cells(lambda c: (c.objective, c.method, c.variant, c.quantize))
              if c.objective == "grpo"]


@pytest.mark.parametrize("cell", [pytest.param(c, id=c.id) for c in GRPO_CELLS])
def test_the_grpo_reference_is_the_starting_model_and_a_fresh_adapter_starts_at_its_closed_form(cell, world, tmp_path):
    import objectives.grpo as grpo
    config, model, start, task, loaders = build(cell, "gpt2", world, tmp_path)
    x, y, advantages, rewards, _, _ = batch = task.prepare(model, loaders[0].next_batch())
    with torch.no_grad():
        reference = task.reference_logps(x, y)
        expected = grpo.completion_logps(start, x, y, config["grpo_temperature"])[0]
        loss_sum, sums = task.loss(model, batch)
    assert (reference - expected).abs().max().item() < 1e-5
    if cell.method in ("full", "lora", "adalora"):  # fresh, the policy is its reference: ratio 1 and k3 = 0
        lengths = (y != -1).sum(dim=1).float()
        closed_form = -(advantages * lengths).sum() / lengths.sum()  # dapo: -sum_i A_i L_i / sum_i L_i
        assert (loss_sum / task.count(batch)).item() == pytest.approx(closed_form.item(), abs=1e-6)
        assert task.metrics(sums)["kl"] == pytest.approx(0, abs=1e-7)


# ---- saved adapters in PEFT, merged exports in transformers --------------------------------------------------------
def perturbed(model, seed=0):
    """The adapter moved away from its start (as training would move it), so that the facts below are not about a
    no-op adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def hf_model(folder):
    import transformers
    from model import load_hf_config
    cls = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls[load_hf_config(folder)["model_type"]].from_pretrained(folder).eval()


def dequantized_folder(world, family):
    """The nf4 base as full-precision weights: what PEFT's model of a QLoRA adapter is."""
    from quant import dequantize
    folder = world["root"] / f"{family}_nf4_dequantized"
    if not folder.exists():
        dequantize(copy.deepcopy(world["bases"][family, "nf4"])).save_pretrained(folder)
    return folder


# LoRA's variants on GPT-2 (Conv1D weights, saved transposed) in full precision and on LLaMA (grouped-query attention)
# on nf4; the other methods on both
ADAPTER_CELLS = [(Cell("lm", "lora", v), "gpt2") for v in VARIANTS]
ADAPTER_CELLS += [(Cell("lm", "lora", v, "nf4"), "llama") for v in VARIANTS if v != "pissa"]
ADAPTER_CELLS += [(Cell("lm", "lora", "modules_to_save"), "llama")]
ADAPTER_CELLS += [(Cell("lm", m), f) for m in ("adalora", *PROMPT_METHODS) for f in ("gpt2", "llama")]
@pytest.mark.parametrize("cell,family", [pytest.param(c, f, id=f"{c.id}-{f}") for c, f in ADAPTER_CELLS])
def test_a_saved_adapter_gives_peft_the_logits_of_ours(cell, family, world, tmp_path):
    peft = pytest.importorskip("peft")
    assert settings_check(cell) is None
    _, model, start, _, _ = build(cell, family, world, tmp_path)
    perturbed(model)
    adapters.method_of(model).save(model, tmp_path / "adapter", base_model_name_or_path=str(world["folders"][family]))
    idx = torch.randint(0, 128, (2, BLOCK), generator=torch.Generator().manual_seed(1))
    base = dequantized_folder(world, family) if cell.quantize else world["folders"][family]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = model(idx)[0]
        theirs = peft.PeftModel.from_pretrained(hf_model(base), tmp_path / "adapter").eval()(input_ids=idx).logits
        before = start(idx)[0]
    assert (theirs[:, -idx.size(1):] - ours).abs().max().item() < 1e-4
    assert (ours - before).abs().max().item() > 1e-3  # the adapter does change the logits


MERGE_CELLS = [Cell("lm", "lora", v, q, merge=True) for q in ("", "nf4") for v in VARIANTS if not (q and v == "pissa")]
MERGE_CELLS += [Cell("lm", "adalora", merge=True)]


@pytest.mark.parametrize("cell", MERGE_CELLS, ids=lambda c: c.id)
def test_the_merged_export_gives_transformers_the_logits_of_the_unmerged_model(cell, world, tmp_path):
    from training.checkpoint import save_merged
    assert settings_check(cell) is None
    family = "llama" if cell.quantize else "gpt2"
    _, model, _, _, _ = build(cell, family, world, tmp_path)
    perturbed(model)
    idx = torch.randint(0, 128, (2, BLOCK), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = model(idx)[0]
    save_merged(model, tmp_path, idx, contextlib.nullcontext())  # what train.py writes: tmp_path/merged
    with torch.no_grad():
        merged = hf_model(tmp_path / "merged")(idx).logits
    assert (merged - unmerged).abs().max().item() < 1e-4


@contextlib.contextmanager
def process_group_of_one(tmp_path):
    """A gloo process group of this process alone: fsdp shards as under torchrun, every shard here."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cell", [
    pytest.param(Cell("lm", "lora", merge=True, parallel="fsdp"), id="lm-lora-merge-fsdp"),
    pytest.param(Cell("lm", "lora", "dora", merge=True, parallel="fsdp"), id="lm-lora-dora-merge-fsdp"),
    pytest.param(Cell("lm", "lora", "modules_to_save", merge=True, parallel="fsdp"),
                 id="lm-lora-modules_to_save-merge-fsdp"),
    pytest.param(Cell("lm", "lora", quantize="nf4", merge=True, parallel="fsdp"), id="lm-lora-nf4-merge-fsdp")])
def test_the_merged_export_of_a_sharded_model_gives_the_logits_of_the_unmerged_model(cell, world, tmp_path):
    from training.checkpoint import save_merged
    from training.parallel import plain_copy, wrap
    assert settings_check(cell) is None
    _, model, _, _, _ = build(cell, "gpt2", world, tmp_path)
    perturbed(model)
    idx = torch.randint(0, 128, (2, BLOCK), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        unmerged = model(idx)[0]
    with process_group_of_one(tmp_path):
        wrap(model, "fsdp", "cpu", 0)
        save_merged(plain_copy(model), tmp_path, idx, contextlib.nullcontext())  # as train.py does: tmp_path/merged
    with torch.no_grad():
        merged = hf_model(tmp_path / "merged")(idx).logits
    assert (merged - unmerged).abs().max().item() < 1e-4


# ---- through train.py -----------------------------------------------------------------------------------------------
def train_flags(cell, family, world, tmp_path, out_dir, **overrides):
    """train.py's flags for a tiny run of the cell (the settings run_settings checks)."""
    data_dir = tmp_path / "data"
    if not data_dir.exists():
        shutil.copytree(world["root"] / cell.objective, data_dir)
    _, given = run_settings(cell, family, world["folders"][family], data_dir, **overrides)
    given.update(out_dir=str(tmp_path / out_dir), eval_interval=0, checkpoint_interval=0, log_interval=1)
    return [f"--{k}={v}" for k, v in given.items()]


DPO_RUNS = [Cell("dpo", "full"), Cell("dpo", "lora", "modules_to_save"), Cell("dpo", "adalora"),
            Cell("dpo", "lora", "dora", "nf4"), Cell("dpo", "lora", "pissa")]


@pytest.mark.parametrize("cell", [pytest.param(c, id=c.id) for c in DPO_RUNS])
def test_a_dpo_run_of_a_fresh_adapter_or_a_full_fine_tune_starts_at_ln_2(cell, world, tmp_path, monkeypatch):
    run_train(train_flags(cell, "gpt2", world, tmp_path, "out", max_steps=1), monkeypatch)
    first = read_log(tmp_path / "out")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # DPO's own (train_loss adds AdaLoRA's penalty)
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-6)


# two processes (gloo on the CPU) with 2 micro-steps each see the tokens of one process with 4
PARALLEL_RUNS = [(Cell("lm", "lora", "dora", "nf4", parallel="fsdp"), "gpt2"),
                 (Cell("sft", "adalora", packing=True, parallel="ddp"), "llama")]


@pytest.mark.slow
@pytest.mark.parametrize("cell,family", PARALLEL_RUNS, ids=lambda c: getattr(c, "id", c))
def test_two_processes_take_the_steps_of_one(cell, family, world, tmp_path, monkeypatch):
    step = dict(total_batch_size=2 * BLOCK * 4, max_steps=3)
    single = Cell(**{**cell.__dict__, "parallel": None})
    run_train(train_flags(single, family, world, tmp_path, "single", **step), monkeypatch)
    result = run_torchrun(train_flags(cell, family, world, tmp_path, "two", **step))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    one, two = read_log(tmp_path / "single"), read_log(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1, 2]
    for key in ("train_loss", "grad_norm"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=2e-4), key
