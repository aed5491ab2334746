"""The README's Python snippets and its curl examples run as written, and its first commands are the
two `make` targets."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def bash_commands(block: str) -> list[str]:
    """The commands of a bash block: trailing comments dropped, a line ending in a backslash or a pipe
    joined with the next (the README's comments hold no quotes, so a quote-free tail is a comment)."""
    commands, current = [], ""
    for line in block.splitlines():
        line = re.sub(r"\s+#\s[^'\"]*$", "", line).strip()
        if not line:
            continue
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
        elif line.endswith("|"):
            current += line + " "
        else:
            commands.append(current + line)
            current = ""
    assert not current, f"a command continues past the end of its block: {current!r}"
    return commands


def readme_commands() -> list[list[str]]:
    return [bash_commands(block) for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)]


def test_readme_opens_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_readme_python_snippets_run():
    blocks = python_blocks()
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_bash_commands_joins_continued_lines_and_drops_comments():
    block = "a -d '{\"k\": 5}' \\\n    -H x   # a comment\npython3 -c 'x' \\\n  | curl y -d @-\nb |  # why\n  c\n"
    assert bash_commands(block) == ["a -d '{\"k\": 5}' -H x", "python3 -c 'x' | curl y -d @-", "b | c"]


def _sterling(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] == "sterling", command
    return words[1:]


def _writer(commands: list[str], prefix: str, out: str) -> str:
    """The README command starting with ``prefix`` that writes ``out`` (its ``--out``)."""
    from sterling.cli import build_parser

    found = [c for c in commands if c.startswith(prefix) and build_parser().parse_args(_sterling(c)).out == out]
    assert found, f"no README command `{prefix} ... --out {out}`"
    return found[0]


@pytest.mark.timeout(180)
def test_readme_curl_examples_run_on_the_demo_data(tmp_path, monkeypatch):
    """The Serve block's curl lines, as written, against the server its `sterling serve` line starts
    (in this process, on a free port) over the data and snapshot the README's own commands write in
    `runs/` (the model trained for 2 steps instead of 5 epochs). Only the host and port change."""
    if shutil.which("curl") is None or shutil.which("bash") is None:
        pytest.skip("curl and bash are needed to run the README's curl lines as written")
    pytest.importorskip("fastapi")
    from sterling import cli
    from sterling.serving import server as server_module
    from sterling.train.loop import TrainConfig, train
    from sterling.train.overarch import OverArchTrainConfig

    blocks = [commands for commands in readme_commands() if any("curl" in c for c in commands)]
    assert len(blocks) == 1, "every curl example is expected in the Serve block (extend this test for another)"
    (serve_block,) = blocks
    everything = [c for commands in readme_commands() for c in commands]

    # the data and the snapshot the `sterling serve` line names, written by the README's commands
    serve_line = next(c for c in serve_block if c.startswith("sterling serve"))
    assert serve_line.endswith(" &"), "the server runs in the background while the curl lines run"
    serve_argv = _sterling(serve_line[: -len(" &")])
    serve_args = cli.build_parser().parse_args(serve_argv)
    monkeypatch.chdir(tmp_path)  # `runs/...` as written; the server (in this process) reloads from here too
    synth = _writer(everything, "sterling data synth", serve_args.data)
    publish = _writer(everything, "sterling publish", serve_args.snapshot)
    checkpoint = cli.build_parser().parse_args(_sterling(publish)).checkpoint
    train_args = cli.build_parser().parse_args(_sterling(_writer(everything, "sterling train", checkpoint)))
    assert cli.main(_sterling(synth)) == 0
    quick = TrainConfig(epochs=1, max_steps=2, overarch=OverArchTrainConfig(epochs=1, max_steps=2))
    train(Path(train_args.data), Path(train_args.out), quick, log=lambda _: None)
    assert cli.main(_sterling(publish)) == 0

    # `sterling serve` as written: the CLI builds the config; the server runs on a thread here
    token = "readme-token"
    monkeypatch.setenv("STERLING_TOKEN", token)
    started = {}
    monkeypatch.setattr(server_module, "serve", lambda config, host, port: started.update(config=config))
    assert cli.main(serve_argv) == 0 and started["config"].token == token
    env = os.environ | {
        "STERLING_TOKEN": token,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    curls = [c for c in serve_block if "curl" in c]
    assert {c.split()[0] for c in serve_block if c not in curls} == {"export", "sterling"}, serve_block
    assert len(curls) >= 6

    with server_module.BackgroundServer(started["config"]) as server:
        answers = {}
        for command in curls:
            assert "localhost:8000" in command, command
            command = command.replace("localhost:8000", f"127.0.0.1:{server.port}")
            asks_status = command.split("|")[-1].split()[0] == "curl"  # not the readiness loop
            if asks_status:
                command += " -w '\\n%{http_code}'"
            run = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30)
            assert run.returncode == 0, (command, run.stderr)
            if not asks_status:
                continue
            body, _, status = run.stdout.rpartition("\n")
            assert 200 <= int(status) < 300, (command, status, body)
            path = re.search(r"127\.0\.0\.1:\d+(/\S*)", command).group(1)
            if path == "/metrics":
                assert "sterling_requests_total" in body
                continue
            answers.setdefault(path, []).append(json.loads(body))
        retrieved = answers["/v1/retrieve"]
        assert len(retrieved) == 2 and all(len(out["ids"]) == 5 for out in retrieved), retrieved
        assert set(answers["/v1/rank"][0]) >= {"task_scores"}, answers["/v1/rank"]
        assert answers["/v1/items"] and answers["/v1/admin/reload"][0]["version"]
        (compacted,) = answers["/v1/admin/compact"]
        assert compacted["compacted"] and server.service.info.path == compacted["snapshot"]
        ids = set(server.service.model.index.ids.tolist())  # the update, through the reload and the compaction
        assert 123456 in ids and 155 not in ids and server.service.model.index.fresh_items == 0


@pytest.mark.timeout(180)
def test_readme_hstu_commands_train_publish_and_query(tmp_path, monkeypatch, capsys):
    """The HSTU block as written (in ``runs/``, training cut to 2 steps): train the retriever and
    the ranker → publish → query, and the answer holds none of the user's history."""
    from dataclasses import replace

    from sterling import cli
    from sterling.train.retrieval import train_retrieval

    (block,) = [
        commands
        for commands in readme_commands()
        if any("--model hstu" in c for c in commands) and not any("data interactions" in c for c in commands)
    ]
    everything = [c for commands in readme_commands() for c in commands]
    train_line, ranker_line, publish_line, query_line = block
    train_args = cli.build_parser().parse_args(_sterling(train_line))
    monkeypatch.chdir(tmp_path)
    assert cli.main(_sterling(_writer(everything, "sterling data synth", train_args.data))) == 0
    parsed = cli.build_parser().parse_args(_sterling(train_line.replace("--epochs 20", "--epochs 1")))
    assert parsed.model == "hstu" and parsed.patience == 3
    from sterling.train.retrieval import RetrievalConfig

    quick = replace(RetrievalConfig(encoder="hstu", dim=16, num_layers=1, max_len=50), max_steps=2, patience=3)
    train_retrieval(Path(train_args.data), quick, log=lambda _: None, out_dir=Path(train_args.out))
    assert cli.main(_sterling(ranker_line) + ["--max-steps", "2", "--dim", "16", "--layers", "1"]) == 0
    assert cli.main(_sterling(publish_line)) == 0
    capsys.readouterr()
    assert cli.main(_sterling(query_line) + ["--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(answer["results"]) == 10
    from sterling.query import _user_history

    history, _, _ = _user_history(Path(train_args.data), 3, 50)
    assert not {r["id"] for r in answer["results"]} & set(history.tolist())


@pytest.mark.timeout(180)
def test_readme_interaction_log_commands_run(tmp_path, monkeypatch, capsys):
    """The "Your own interaction log" block as written (in ``runs/``, on a small text log written
    here, training cut to 2 steps of a small HSTU): load → train → publish → query."""
    import numpy as np

    from sterling import cli

    (block,) = [commands for commands in readme_commands() if any("data interactions" in c for c in commands)]
    load_line, train_line, publish_line, query_line = block
    monkeypatch.chdir(tmp_path)
    log = cli.build_parser().parse_args(_sterling(load_line)).src
    rng = np.random.default_rng(0)
    lines = [" ".join(map(str, [user, *rng.integers(1, 60, rng.integers(3, 15))])) for user in range(1, 40)]
    Path(log).write_text("\n".join(lines) + "\n")
    assert cli.main(_sterling(load_line)) == 0
    assert cli.build_parser().parse_args(_sterling(train_line)).model == "hstu"
    quick = ["--epochs", "1", "--max-steps", "2", "--dim", "16", "--layers", "1", "--max-len", "20"]
    assert cli.main(_sterling(train_line) + quick) == 0
    assert cli.main(_sterling(publish_line)) == 0
    capsys.readouterr()
    assert cli.main(_sterling(query_line) + ["--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(answer["results"]) == 10
    history = {int(item) for item in lines[0].split()[1:]}  # user 1's items are never recommended back
    assert not {r["id"] for r in answer["results"]} & history
