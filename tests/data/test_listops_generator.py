"""The ListOps generator against an independent evaluator and the LRA reference's written form."""

from __future__ import annotations

import itertools
import json
import statistics

import pytest

from mra_lra.data import listops_generator
from mra_lra.data.listops_generator import (
    SIDECAR_NAME,
    ListOpsExample,
    _draw_task,
    generate_listops,
    generate_splits,
    main,
    write_listops_files,
    write_node,
    write_tsv,
)

SMALL = {"min_length": 10, "max_length": 60}


def tokens_of(source: str) -> list[str]:
    return source.replace("(", " ").replace(")", " ").split()


def evaluate(source: str) -> int:
    """Evaluate a ListOps expression (parentheses optional) with a stack, independently of the
    generator: MED is statistics.median truncated, SM the sum mod 10."""
    ops = {
        "[MIN": min,
        "[MAX": max,
        "[MED": lambda xs: int(statistics.median(xs)),
        "[SM": lambda xs: sum(xs) % 10,
    }
    stack: list[tuple[str, list[int]]] = []
    result = None
    for tok in tokens_of(source):
        if tok in ops:
            stack.append((tok, []))
            continue
        value = ops[stack[-1][0]](stack.pop()[1]) if tok == "]" else int(tok)
        if stack:
            stack[-1][1].append(value)
        else:
            result = value
    assert not stack and result is not None, f"unbalanced expression {source!r}"
    return result


def parse(source: str) -> tuple:
    """Token list -> nested (op, [children]) / int tree."""
    toks = iter(tokens_of(source))

    def node(tok: str):
        if tok.startswith("["):
            children = []
            for nxt in toks:
                if nxt == "]":
                    return (tok, children)
                children.append(node(nxt))
            raise AssertionError("missing ]")
        return int(tok)

    tree = node(next(toks))
    assert next(toks, None) is None
    return tree


def nodes(tree):
    """The operator nodes of a parsed tree, (op, children) each."""
    if not isinstance(tree, int):
        yield tree
        for child in tree[1]:
            yield from nodes(child)


def reference_written_form(tree) -> str:
    """The LRA reference's to_string over its tuple pairing: t = (op, c1); t = (t, c_i); (t, ])."""

    def pairs(node):
        if isinstance(node, int):
            return node
        op, children = node
        t = (op, pairs(children[0]))
        for child in children[1:]:
            t = (t, pairs(child))
        return (t, "]")

    def to_string(t) -> str:
        if isinstance(t, tuple):
            return "( " + to_string(t[0]) + " " + to_string(t[1]) + " )"
        return str(t)

    return to_string(pairs(tree))


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("[MAX 2 9 ]", 9),
        ("[MIN 4 1 7 ]", 1),
        ("[MED 1 2 3 4 ]", 2),
        ("[MED 7 1 3 ]", 3),
        ("[MED 0 9 ]", 4),
        ("[SM 5 7 ]", 2),
        ("[MIN 3 [MAX 1 8 ] 5 ]", 3),
        ("[MED 9 [SM 4 4 ] 1 ]", 8),
        ("[SM [MAX 9 9 ] [MIN 8 9 ] [MED 1 2 ] ]", 8),
        ("( ( ( [MAX 2 ) 9 ) ] )", 9),
    ],
)
def test_independent_evaluator(expression: str, value: int) -> None:
    assert evaluate(expression) == value


def test_written_form_of_hand_built_trees() -> None:
    assert write_node("[MAX", ["2", "9"]) == "( ( ( [MAX 2 ) 9 ) ] )"
    nested = write_node("[MIN", [write_node("[MAX", ["2", "9"]), "3"])
    assert nested == "( ( ( [MIN ( ( ( [MAX 2 ) 9 ) ] ) ) 3 ) ] )"
    assert nested == reference_written_form(("[MIN", [("[MAX", [2, 9]), 3]))


def test_tsv_format(tmp_path) -> None:
    path = tmp_path / "basic_val.tsv"
    write_tsv(path, [ListOpsExample("( ( ( [MAX 2 ) 9 ) ] )", 9), ListOpsExample("4", 4)])
    assert path.read_bytes() == b"Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\n4\t4\n"
    assert [p.name for p in tmp_path.iterdir()] == ["basic_val.tsv"]


@pytest.fixture(scope="module")
def small_set() -> list[ListOpsExample]:
    return generate_listops(300, seed=3, progress=False, **SMALL)


def test_generated_labels_match_independent_evaluator(small_set) -> None:
    for ex in small_set:
        assert ex.target == evaluate(ex.source), ex.source


def test_generated_written_form_matches_reference(small_set) -> None:
    for ex in small_set:
        assert ex.source == reference_written_form(parse(ex.source))
        assert "  " not in ex.source and "\t" not in ex.source


def test_generated_trees_cover_every_operator_and_even_medians(small_set) -> None:
    all_nodes = [n for ex in small_set for n in nodes(parse(ex.source))]
    assert {op for op, _ in all_nodes} == {"[MIN", "[MAX", "[MED", "[SM"}
    assert any(op == "[MED" and len(children) % 2 == 0 for op, children in all_nodes)
    assert {ex.target for ex in small_set} == set(range(10))


def test_length_bounds_distinct_and_depth(small_set) -> None:
    lengths = [len(tokens_of(ex.source)) for ex in small_set]
    assert all(10 < n < 60 for n in lengths)
    assert len({ex.source for ex in small_set}) == len(small_set)

    def depth(tree) -> int:
        return 1 if isinstance(tree, int) else 1 + max(depth(c) for c in tree[1])

    trees = [parse(ex.source) for ex in small_set]
    assert max(depth(t) for t in trees) <= 10
    assert {len(children) for t in trees for _, children in nodes(t)} <= set(range(2, 11))


def test_release_length_bounds() -> None:
    examples = generate_listops(5, seed=0, progress=False)
    assert all(500 < len(tokens_of(ex.source)) < 2000 for ex in examples)


def test_seeded_and_deterministic(small_set) -> None:
    assert generate_listops(300, seed=3, progress=False, **SMALL) == small_set
    assert generate_listops(300, seed=4, progress=False, **SMALL) != small_set


def test_splits_are_consecutive_draws() -> None:
    splits = generate_splits(5, 3, 2, seed=1, progress=False, **SMALL)
    flat = splits["train"] + splits["val"] + splits["test"]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [5, 3, 2]
    assert flat == generate_listops(10, seed=1, progress=False, **SMALL)


def test_rejects_empty_length_range() -> None:
    with pytest.raises(ValueError, match="min_length"):
        generate_listops(1, min_length=10, max_length=11)


def test_bounds_with_too_few_trees_stop_with_a_clear_error(monkeypatch) -> None:
    # 0 < length < 3 holds only the ten single digits: asking for 11 used to draw forever.
    monkeypatch.setattr(listops_generator, "STALL_DRAWS", 2_000)
    with pytest.raises(ValueError, match="after 10 of the 11 asked for.*data.gen_max_length"):
        generate_listops(11, min_length=0, max_length=3, progress=False)
    assert len(generate_listops(10, min_length=0, max_length=3, progress=False)) == 10


def test_write_files_and_sidecar_refuses_overwrite(tmp_path) -> None:
    write_listops_files(tmp_path, 4, 2, 2, seed=5, progress=False, **SMALL)
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        lines = (tmp_path / f"basic_{split}.tsv").read_text().splitlines()
        assert lines[0] == "Source\tTarget" and len(lines) == n + 1
        for line in lines[1:]:
            source, target = line.split("\t")
            assert int(target) == evaluate(source)
    settings = json.loads((tmp_path / SIDECAR_NAME).read_text())
    assert settings["seed"] == 5 and settings["num_train"] == 4 and settings["max_length"] == 60
    before = (tmp_path / "basic_train.tsv").read_text()
    with pytest.raises(FileExistsError, match="basic_train.tsv"):
        write_listops_files(tmp_path, 4, 2, 2, seed=6, progress=False, **SMALL)
    assert (tmp_path / "basic_train.tsv").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli(tmp_path, capsys) -> None:
    out = tmp_path / "listops"
    args = ["--out", str(out), "--num-train", "3", "--num-val", "1", "--num-test", "1"]
    main(args + ["--min-length", "10", "--max-length", "60", "--seed", "2"])
    assert "basic_test.tsv" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(args)
    assert "already exist" in capsys.readouterr().err
    lines = (out / "basic_train.tsv").read_text().splitlines()
    expected = generate_splits(3, 1, 1, seed=2, progress=False, **SMALL)["train"]
    assert lines[1:] == [f"{ex.source}\t{ex.target}" for ex in expected]


def test_write_files_refuses_a_folder_with_other_files(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_listops_files(tmp_path, 2, 1, 1, seed=0, progress=False, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".tmp-{tmp_path.name}")]


@pytest.mark.parametrize("bounds", [SMALL, {"min_length": 0, "max_length": 6}])
def test_same_trees_for_any_number_of_workers(bounds) -> None:
    # 0 < length < 6 allows 4,410 trees, so tasks repeat each other's trees and the set is topped
    # up from later tasks.
    serial = generate_listops(1000, seed=2, progress=False, **bounds)
    assert generate_listops(1000, seed=2, progress=False, workers=3, **bounds) == serial
    assert len({ex.source for ex in serial}) == len(serial) == 1000
    # The set is the first distinct trees of tasks 0, 1, 2, ... in order.
    drawn = (ex for j in itertools.count() for ex in _draw_task((2, j, *bounds.values()))[0])
    distinct: dict[ListOpsExample, None] = {}  # insertion-ordered
    for ex in drawn:
        distinct.setdefault(ex)
        if len(distinct) == len(serial):
            break
    assert list(distinct) == serial
    assert generate_listops(300, seed=2, progress=False, workers=2, **bounds) == serial[:300]
