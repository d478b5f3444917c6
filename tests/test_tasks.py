"""Task suites and their scorers: right and wrong answers, and a sandbox that stops programs
which hang, reach for the network or write outside their folder."""

from __future__ import annotations

import json
import socket

import pytest
from click.testing import CliRunner

from clp.cli import main
from clp.errors import ClpError
from clp.metrics import standard_error
from clp.tasks import half, humaneval, load_suite, paired_accuracy, sandbox, score
from clp.tasks.gsm8k import final_number
from clp.tasks.humaneval import extract_code

namespaces = pytest.mark.skipif(not sandbox.wrapper(), reason="no namespaces on this machine")


def cli(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def code():
    return {t.id: t for t in load_suite("code")}


@pytest.fixture(scope="module")
def math():
    return load_suite("math")


def test_suites_ship_enough_tasks_split_in_fixed_halves(code, math):
    assert len(code) == 164 and len(math) == 1319
    for tasks in (list(code.values()), math):
        assert len({t.id for t in tasks}) == len(tasks)
        tune, report = half(tasks, "tune"), half(tasks, "report")
        assert len(tune) + len(report) == len(tasks) and abs(len(tune) - len(report)) <= 1
        assert {t.index % 2 for t in tune} == {0} and {t.index % 2 for t in report} == {1}
    assert load_suite("humaneval")[3].id == "HumanEval/3" and math[0].answer == "18"
    with pytest.raises(ClpError, match="unknown task suite 'mmlu'"):
        load_suite("mmlu")


def test_code_a_right_reply_passes_and_a_wrong_one_fails(code):
    task = code["HumanEval/0"]
    assert "def has_close_elements" in task.prompt() and "```python" in task.prompt()
    right = (
        "Here is the function:\n\n```python\nfrom typing import List\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    return any(abs(a - b) < threshold\n"
        "               for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```\n"
        "It compares every pair."
    )
    assert score(task, right).solved
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    s = score(task, wrong)
    assert not s.solved and s.reason == "AssertionError"
    # HumanEval's own format: the body alone continues the prompt's stub
    assert score(task, task.canonical_solution).solved
    # the prompt's helper functions exist when the reply defines only the asked one
    palindrome = code["HumanEval/10"]
    only_target = (
        "```python\ndef make_palindrome(string: str) -> str:\n"
        "    i = 0\n    while not is_palindrome(string[i:]):\n        i += 1\n"
        "    return string + string[:i][::-1]\n```"
    )
    assert score(palindrome, only_target).solved


def test_code_extraction_takes_the_first_python_block():
    reply = "```text\nnot code\n```\n```python\nx = 1\n```\n```python\nx = 2\n```"
    assert extract_code(reply) == "x = 1\n"
    assert extract_code("Sure:\n```python\ndef f():\n    return 1") == "def f():\n    return 1"
    assert extract_code("```\ny = 3\n```") == "y = 3\n"
    assert extract_code("    return 1\n") == "    return 1\n"


@pytest.mark.parametrize(
    "reply, number",
    [
        ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\nThe answer is 18.", "18"),
        ("So she makes $18 a day.\n#### 18", "18"),
        ("The answer is: **$1,250.00**", "1,250.00"),
        ("I first thought the answer is 7, not 3.\nFinal answer: 9", "9"),
        ("The answer is 1,000, so", "1,000"),
        ("Answer: -4", "-4"),
        ("The total is \\boxed{42}.", "42"),
        ("3 apples and 4 pears: 7 fruits", "7"),
        ("no digits at all", None),
    ],
)
def test_math_final_number(reply, number):
    assert final_number(reply) == number


def test_math_a_right_reply_is_correct_and_a_wrong_one_is_not(math):
    task = math[0]  # Janet's ducks: 18
    assert task.question in task.prompt() and "The answer is N." in task.prompt()
    assert score(task, "She sells 9 eggs at $2.\nThe answer is $18.00.").solved
    wrong = score(task, "She sells 8 eggs at $2.\nThe answer is 16.")
    assert not wrong.solved and wrong.reason == "answered 16, expected 18"
    assert score(task, "I do not know.").reason == "no number in the reply"


@pytest.mark.parametrize("program", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"])
def test_a_program_that_hangs_is_stopped_at_the_timeout(program):
    out = sandbox.run_python(program, timeout=1)
    assert not out.passed and out.reason == "timed out after 1 s" and out.seconds < 5


def test_a_reply_that_loops_fails_its_task(code, monkeypatch):
    monkeypatch.setattr(humaneval, "TIMEOUT", 1.0)
    loop = "```python\ndef has_close_elements(numbers, t):\n    while True:\n        pass\n```"
    s = score(code["HumanEval/0"], loop)
    assert not s.solved and s.reason == "timed out after 1 s"


@pytest.fixture
def listener():
    """A local server that records whether anything ever reached it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.setblocking(False)
    yield srv
    srv.close()


def _reached(srv: socket.socket) -> bool:
    try:
        srv.accept()[0].close()
        return True
    except BlockingIOError:
        return False


CONNECT = [  # by name resolution first, and a raw socket straight to the address
    "import socket\nsocket.create_connection(({host!r}, {port}), 2).sendall(b'x')\n",
    "import socket\ns = socket.socket()\ns.connect(({host!r}, {port}))\ns.sendall(b'x')\n",
]


@pytest.mark.parametrize("host", ["127.0.0.1", "192.0.2.1"])  # loopback; TEST-NET-1 (RFC 5737)
@pytest.mark.parametrize("program", CONNECT)
def test_network_is_blocked_before_anything_is_sent(listener, host, program):
    port = listener.getsockname()[1] if host == "127.0.0.1" else 80
    out = sandbox.run_python(program.format(host=host, port=port), timeout=5)
    assert not out.passed and out.reason.startswith("blocked socket.")
    assert not _reached(listener)


@namespaces
def test_the_network_namespace_alone_has_no_route(listener):
    port = listener.getsockname()[1]
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 2)\n"
    out = sandbox.run_python(program, timeout=5, guard=False)  # kernel layer only
    assert not out.passed and "Network is unreachable" in out.reason
    assert not _reached(listener)


def test_writes_outside_the_temp_folder_are_stopped(tmp_path):
    target, keep = tmp_path / "escaped.txt", tmp_path / "keep.txt"
    keep.write_text("mine")
    out = sandbox.run_python(f"open({str(target)!r}, 'w').write('x')\n", timeout=5)
    assert out.reason == f"blocked open for writing {str(target)!r}" and not target.exists()
    out = sandbox.run_python(f"import os\nos.remove({str(keep)!r})\n", timeout=5)
    assert out.reason.startswith("blocked os.remove") and keep.read_text() == "mine"
    inside = "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n"
    assert sandbox.run_python(inside, timeout=5).passed  # its own folder is writable


@namespaces
def test_the_read_only_mounts_alone_stop_writes(tmp_path):
    target = tmp_path / "escaped.txt"
    out = sandbox.run_python(f"open({str(target)!r}, 'w')\n", timeout=5, guard=False)
    assert "Read-only file system" in out.reason and not target.exists()


@pytest.mark.parametrize(
    "program, event",
    [
        ("import os\nos.system('true')", "os.system"),
        ("import subprocess\nsubprocess.run(['true'])", "subprocess.Popen"),
        ("import os\nos.kill(os.getppid(), 0)", "os.kill"),  # signal 0: harmless if let through
        ("import ctypes", "ctypes.dlopen"),
    ],
)
def test_processes_signals_and_ctypes_are_blocked(program, event):
    assert sandbox.run_python(program, timeout=5).reason == f"blocked {event}"


def test_paired_accuracy_is_the_mean_and_se_of_per_task_differences():
    ar = {0: True, 1: True, 2: False, 3: True}
    clp = {0: True, 1: False, 2: False, 3: False}
    got = paired_accuracy(clp, ar)
    diffs = [0.0, -1.0, 0.0, -1.0]
    assert got["task_accuracy"] == 0.25 and got["task_accuracy_delta"] == -0.5
    assert got["task_accuracy_delta_se"] == pytest.approx(standard_error(diffs), abs=1e-4)
    assert paired_accuracy(ar, ar)["task_accuracy_delta_se"] == 0.0
    assert paired_accuracy({}, ar)["task_accuracy"] is None


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from conftest import make_tiny_backbone

    bb = make_tiny_backbone(context=1024)  # GSM8K prompts are a few hundred characters
    path = tmp_path_factory.mktemp("tiny")
    bb.model.save_pretrained(path)
    bb.tokenizer.save_pretrained(path)
    return str(path)


def test_bench_scores_every_variant_on_a_task_suite(tiny_dir, tmp_path):
    args = ["bench", "-m", tiny_dir, "--dtype", "fp32", "--modes", "ar,lookup", "--prompts"]
    args += ["math", "--n", "4", "--max-new-tokens", "6", "--no-nll", "--out", str(tmp_path)]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:  # every output was scored, outside the timed generation
        for rec in line["runs"].values():
            assert rec["solved"] is False and rec["reason"]
    # known outcomes: ar solves tasks 0, 1, 2; lookup only 0 (halves: tune 0, 2; report 1, 3)
    for line, ar, lookup in zip(lines, [1, 1, 1, 0], [1, 0, 0, 0], strict=True):
        line["runs"]["ar"]["solved"], line["runs"]["lookup"]["solved"] = bool(ar), bool(lookup)
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = cli(*args, "--report")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    ar, lookup = res["modes"]["ar"], res["modes"]["lookup"]
    assert ar["task_accuracy"] == 0.75 and ar["task_accuracy_delta"] == 0.0
    assert lookup["task_accuracy"] == 0.25 and lookup["task_accuracy_delta"] == -0.5
    assert lookup["task_accuracy_delta_se"] == pytest.approx(standard_error([0, -1, -1, 0]), 1e-3)
    halves = res["by_category"]
    assert halves["tune"]["lookup"]["task_accuracy"] == 0.5
    assert halves["report"]["lookup"]["task_accuracy"] == 0.0
    md = (tmp_path / "results.md").read_text()
    assert "| lookup | 1/4 | 0.250 | -0.500 ± 0.289 | 0.500 | 0.000 |" in md
    assert (tmp_path / "speed_vs_task_accuracy.png").stat().st_size > 0


@pytest.mark.parametrize("mode", ["mtp", "gate", "clp", "clp+", "competing"])
def test_generate_warns_once_that_unverified_modes_may_change_answers(tiny_dir, mode):
    r = cli("generate", "-m", tiny_dir, "--dtype", "fp32", "--mode", mode, "-n", "3", "Hi")
    warnings = [x for x in r.stderr.splitlines() if x.startswith("warning:")]
    assert warnings == [
        f"warning: mode {mode} is unverified: it keeps draft tokens the backbone never checked, "
        "so its output may differ from ar's and change answers (--mode verify is lossless)"
    ]


@pytest.mark.parametrize("mode", ["clp", "clp+"])
def test_generate_says_when_clp_accepts_no_drafts_at_its_default_tau(tiny_dir, mode):
    args = ("generate", "-m", tiny_dir, "--dtype", "fp32", "--mode", mode, "-n", "3", "Hi")
    assert f"note: {mode} accepts no drafts at its default tau (> 1)" in cli(*args).stderr
    assert "note:" not in cli(*args, "--tau", "0.5").stderr


@pytest.mark.parametrize("mode", ["ar", "verify", "lookup"])
def test_generate_does_not_warn_for_lossless_modes(tiny_dir, mode):
    r = cli("generate", "-m", tiny_dir, "--dtype", "fp32", "--mode", mode, "-n", "3", "Hi")
    assert "warning:" not in r.stderr


def test_generate_help_names_verify_the_default_and_fastest_lossless_mode():
    help_text = " ".join(cli("generate", "--help").output.split())
    assert "Default: verify, the fastest lossless mode" in help_text


def test_a_code_reply_stops_where_its_block_closes_in_every_variant(tiny_dir, code):
    """A suite's stop strings end generation where its scored part has ended, in our loop and
    in transformers' generate alike; an opening ```python fence does not stop it."""
    from clp.api import load
    from clp.bench import Variant, run_one

    assert code["HumanEval/0"].stop == (humaneval.CLOSING_FENCE,)
    assert humaneval.CLOSING_FENCE not in "Here it is:\n```python\ndef f():\n"
    model = load(tiny_dir, "fp32", runtime="transformers")
    ids = model.tokenizer.encode("Hi")
    full = run_one(model, Variant("ar", "ar"), ids, 40, 3)["ids"]
    text = model.tokenizer.decode(full, skip_special_tokens=True)
    stop = text[12:15]
    decoded = [model.tokenizer.decode(full[:n], skip_special_tokens=True) for n in range(41)]
    end = next(n for n, t in enumerate(decoded) if stop in t)  # the token that completes it
    for v in (Variant("ar", "ar"), Variant("hf-generate", "hf-generate")):
        got = run_one(model, v, ids, 40, 3, (stop,))["ids"]
        assert got == full[:end], v.name


def _half(tps: float, delta: float) -> dict:
    return {"tokens_per_second": tps, "speedup": tps / 10, "task_accuracy_delta": delta,
            "task_accuracy_delta_se": 0.01}  # fmt: skip


def test_the_default_tau_is_the_fastest_within_two_points_on_the_tune_half():
    from clp.tasks.stats import choose_tau

    variants = {"ar": ("ar", None), "clp": ("clp", 0.8), "clp@tau=0.95": ("clp", 0.95),
                "clp+": ("clp+", 0.8), "clp+@tau=0.95": ("clp+", 0.95)}  # fmt: skip
    tune = {"ar": _half(10, 0), "clp": _half(12, -0.03), "clp@tau=0.95": _half(11, -0.01),
            "clp+": _half(12, -0.10), "clp+@tau=0.95": _half(9.5, 0.0)}  # fmt: skip
    report = {n: _half(10.5, -0.05) for n in tune}
    result = {
        "modes": {n: {"variant": {"mode": m, "tau": t}} for n, (m, t) in variants.items()},
        "by_category": {"tune": tune, "report": report},
    }
    got = choose_tau(result)
    # clp: 0.8 is faster but 3 points worse; 0.95 is within 2 and reported on the other half
    assert got["clp"]["tau"] == 0.95 and got["clp"]["variant"] == "clp@tau=0.95"
    assert got["clp"]["report"]["task_accuracy_delta"] == -0.05
    # clp+: 0.95 keeps accuracy but is slower than ar: accept nothing
    assert got["clp+"]["tau"] is None
    assert choose_tau({"modes": result["modes"], "by_category": {}}) == {}
