"""models.sharing: prompt trie -> sharing tree (depths 0-3, ragged, identical prompts, explicit trees)."""

import re
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.sharing import SharedLevel, SharingTree, build_sharing_tree, expand_samples, synthetic_tree


def spelled(tree, prompts):
    return all(tree.prompt(b) == tuple(p) for b, p in enumerate(prompts))


def level_nodes(tree):
    return [[len(n) for n in lv.nodes] for lv in tree.levels]


def test_no_common_prefix():
    prompts = [[1, 2, 3], [4, 5], [6]]
    tree = build_sharing_tree(prompts)
    assert tree.levels == () and tree.suffixes == ((1, 2, 3), (4, 5), (6,))


def test_depth1_one_shared_prefix():
    prompts = [[9, 9, 9, 1, 2], [9, 9, 9, 3], [9, 9, 9, 4, 5, 6]]
    tree = build_sharing_tree(prompts)
    assert len(tree.levels) == 1
    assert tree.levels[0].nodes == ((9, 9, 9),) and tree.levels[0].seq_to_node == (0, 0, 0)
    assert tree.suffixes == ((1, 2), (3,), (4, 5, 6))
    assert spelled(tree, prompts)


def test_depth2_fewshot_problem_samples():
    few = [7] * 10
    problems = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]
    prompts = expand_samples([few + p for p in problems], 4)
    tree = build_sharing_tree(prompts)
    assert len(tree.levels) == 2
    assert tree.levels[0].nodes == (tuple(few),)
    assert tree.levels[1].nodes == ((1, 2), (4, 5, 6, 7), (9,))
    assert tree.levels[1].seq_to_node == (0,) * 4 + (1,) * 4 + (2,) * 4
    assert all(len(s) == 1 for s in tree.suffixes)  # only the last prompt token is per sample
    assert spelled(tree, prompts)


def test_depth3_and_cap():
    # system prompt -> two tasks -> two problems each -> 2 samples each
    prompts = expand_samples([[1, 1, 1, 2, 2, 5, 5, 0], [1, 1, 1, 2, 2, 6, 6, 0],
                              [1, 1, 1, 3, 3, 7, 7, 0], [1, 1, 1, 3, 3, 8, 8, 0]], 2)
    tree = build_sharing_tree(prompts, max_depth=3)
    assert level_nodes(tree) == [[3], [2, 2], [2, 2, 2, 2]]
    assert spelled(tree, prompts)
    capped = build_sharing_tree(prompts, max_depth=2)  # deeper edges merge into the deepest level
    assert level_nodes(capped) == [[3], [4, 4, 4, 4]]
    assert capped.levels[1].nodes[0] == (2, 2, 5, 5)
    assert spelled(capped, prompts)
    flat = build_sharing_tree(prompts, max_depth=0)
    assert flat.levels == () and spelled(flat, prompts)


def test_ragged_tree_uses_empty_nodes():
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 7], [8, 9]]
    tree = build_sharing_tree(prompts)
    assert spelled(tree, prompts)
    # level 0: (1,2) shared by three, empty node for the fourth; level 1: (3,4) for the first two
    assert tree.levels[0].nodes == ((1, 2), ())
    assert tree.levels[0].seq_to_node == (0, 0, 0, 1)
    assert tree.levels[1].nodes == ((3, 4), ())
    assert tree.levels[1].seq_to_node == (0, 0, 1, 1)
    assert tree.suffixes == ((5,), (6,), (7,), (8, 9))


def test_identical_prompts():
    prompts = [[5, 6, 7, 8]] * 6
    tree = build_sharing_tree(prompts)
    assert tree.levels[0].nodes == ((5, 6, 7),)
    assert tree.suffixes == ((8,),) * 6
    single = build_sharing_tree([[4]] * 3)  # one-token prompts: nothing to share
    assert single.levels == () and single.suffixes == ((4,),) * 3


def test_bad_input():
    with pytest.raises(ValueError, match="empty prompt list"):
        build_sharing_tree([])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        build_sharing_tree([[1], []])
    for bad in (0, 2.5, True):  # 2.5 was a TypeError from range, True taken as 1
        with pytest.raises(ValueError, match=rf"num_samples must be an integer >= 1, got {bad!r}"):
            expand_samples([[1]], bad)


def test_explicit_tree_validation():
    lv = SharedLevel(nodes=((1, 2),), seq_to_node=(0, 0))
    tree = SharingTree((lv,), ((3,), (4, 5)))
    assert tree.prompt(1) == (1, 2, 4, 5) and tree.prefix_length(1) == 2
    # each sequence's own nodes: 2 + 1 tokens for sequence 0, 3 + 1 for sequence 1
    two = SharingTree((SharedLevel(((1, 2), (1, 2, 3)), (0, 1)), SharedLevel(((7,), (8,)), (0, 1))), ((3,), (4,)))
    assert [two.prefix_length(b) for b in range(2)] == [3, 4]
    with pytest.raises(ValueError, match="suffix of sequence 0 is empty"):
        SharingTree((lv,), ((), (4,)))
    with pytest.raises(ValueError, match="maps 2 sequences, expected 3"):
        SharingTree((lv,), ((3,), (4,), (5,)))
    with pytest.raises(ValueError, match="outside"):
        SharingTree((SharedLevel(((1,),), (0, 1)),), ((3,), (4,)))
    with pytest.raises(ValueError, match=r"different tokens before it: sequence 0 through ancestors \(0,\), "
                                         r"sequence 1 through \(1,\)"):
        SharingTree((SharedLevel(((1,), (2,)), (0, 1)), SharedLevel(((3,),), (0, 0))), ((3,), (4,)))
    # ancestors that are other nodes but spell the same tokens (two empty nodes, two copies of a node) are the same
    # prefix: the node's keys and values are those of either
    for twins in (((), ()), ((7, 8), (7, 8))):
        tree = SharingTree((SharedLevel(twins, (0, 1)), SharedLevel(((3,),), (0, 0))), ((4,), (5,)))
        assert tree.prompt(0)[:-1] == tree.prompt(1)[:-1]
    with pytest.raises(ValueError, match="different tokens before it"):  # one token more is another prefix
        SharingTree((SharedLevel(((7, 8), (7, 8, 9)), (0, 1)), SharedLevel(((3,),), (0, 0))), ((4,), (5,)))


def test_synthetic_tree():
    tree = synthetic_tree(batch=5, shared_len=100, unique_len=3, vocab_size=50)
    assert tree.num_sequences == 5 and len(tree.levels[0].nodes[0]) == 100
    assert all(len(s) == 3 for s in tree.suffixes)
    assert synthetic_tree(batch=1, shared_len=0, unique_len=1, vocab_size=1).levels == ()


@pytest.mark.parametrize("change, name, least", [(dict(batch=0), "batch", 1), (dict(batch=2.0), "batch", 1),
                                                 (dict(shared_len=-1), "shared_len", 0),
                                                 (dict(unique_len=1.5), "unique_len", 1),
                                                 (dict(vocab_size=0), "vocab_size", 1),
                                                 (dict(batch=True), "batch", 1), (dict(seed=-1), "seed", 0),
                                                 (dict(seed=1.5), "seed", 0), (dict(seed=True), "seed", 0)])
def test_synthetic_tree_names_a_bad_argument(change, name, least):
    """Each argument checked by name (numpy's "negative dimensions" or "high <= 0", and a tree without sequences,
    named none of them)."""
    args = dict(batch=3, shared_len=4, unique_len=2, vocab_size=10)
    args.update(change)
    with pytest.raises(ValueError, match=rf"synthetic_tree: {name} must be an integer >= {least}, got "
                                         rf"{re.escape(repr(change[name]))}"):
        synthetic_tree(**args)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), min_size=1, max_size=10),
       st.integers(0, 4))
def test_trie_spells_prompts(prompts, depth):
    tree = build_sharing_tree(prompts, max_depth=depth)
    assert spelled(tree, prompts)
    assert len(tree.levels) <= depth
    for lv in tree.levels:  # every non-empty node is read by >= 2 sequences
        for n, toks in enumerate(lv.nodes):
            if toks:
                assert lv.seq_to_node.count(n) >= 2


def test_nested_prompts_deeper_than_the_recursion_limit():
    """Prompts that each extend the one before (every prefix of a document) make a trie chain as deep as the batch:
    built without recursion (it raised RecursionError from ~1000 such prompts; here the limit is lowered to 150
    for 300 prompts), capped to max_depth levels."""
    doc = [int(t) for t in np.random.default_rng(0).integers(0, 50, 300)]
    prompts = [doc[:i + 1] for i in range(300)]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(150)
    try:
        tree = build_sharing_tree(prompts, max_depth=3)
    finally:
        sys.setrecursionlimit(limit)
    assert spelled(tree, prompts) and len(tree.levels) == 3


def test_token_ids_and_node_indices_must_be_integers():
    """No rounding of token ids or node indices: floats (even 2.0), bools and nested lists are refused, naming
    where; numpy and JAX integers are taken."""
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    with pytest.raises(ValueError, match=r"build_sharing_tree: prompt 0: element 0 must be an integer, got 1\.5"):
        build_sharing_tree([[1.5, 2, 3], [1, 2, 4]])
    with pytest.raises(ValueError, match="prompt 1: element 2 must be an integer, got True"):
        build_sharing_tree([[1, 2, 3], [1, 2, True]])
    with pytest.raises(ValueError, match="prompt 0: must be a 1-D array of integers, got dtype float"):
        build_sharing_tree([np.array([1.0, 2.0])])
    with pytest.raises(ValueError, match=r"SharedLevel: node 0: element 1 must be an integer, got 2\.5"):
        SharedLevel(((1, 2.5),), (0, 0))
    with pytest.raises(ValueError, match=r"SharedLevel: seq_to_node: element 0 must be an integer, got 0\.9"):
        SharedLevel(((1, 2),), (0.9, 0))
    with pytest.raises(ValueError, match=r"suffix of sequence 1: element 0 must be an integer, got 2\.0"):
        SharingTree((), ((1,), (2.0,)))
    tree = build_sharing_tree([jnp.array([1, 2, 3]), np.array([1, 2, 4]), [1, 2, np.int32(5)]])
    assert spelled(tree, [[1, 2, 3], [1, 2, 4], [1, 2, 5]])
    assert all(type(t) is int for t in tree.prompt(0))


@pytest.mark.parametrize("make,message", [
    (lambda: SharedLevel(((1,),), 0), r"SharedLevel: seq_to_node: must be a sequence of integers, got 0"),
    (lambda: SharedLevel((1, 2), (0, 0)), r"SharedLevel: nodes: must be a sequence of nodes, .*; element 0 is 1"),
    (lambda: SharingTree(((((1, 2),), (0, 0)),), ((3,), (4,))),
     r"SharingTree: level 0 must be a SharedLevel\(nodes, seq_to_node\), got tuple"),
    (lambda: SharingTree(None, ((3,),)), r"SharingTree: levels: must be a sequence of SharedLevel; got NoneType"),
    (lambda: SharingTree((), (3, 4)), r"SharingTree: suffixes: must be .*; element 0 is 3"),
    (lambda: SharingTree((), (None, (4,))), r"SharingTree: suffixes: must be .*; element 0 is None"),
    (lambda: SharingTree((), "ab"), r"SharingTree: suffixes: must be .*; got str"),
])
def test_malformed_trees_are_refused_by_name(make, message):
    """A bare int, a flat list or a tuple where a level, nodes or suffixes belong: a ValueError naming the part (they
    raised TypeError / AttributeError naming nothing)."""
    with pytest.raises(ValueError, match=message):
        make()


def test_trees_take_iterators_and_arrays():
    tree = SharingTree(iter([SharedLevel(iter([(1, 2)]), np.array([0, 0]))]), np.array([[3], [4]]))
    assert tree.prompt(0) == (1, 2, 3) and tree.prompt(1) == (1, 2, 4)


def test_bytes_are_token_ids():
    """bytes are a sequence of ints (a str is refused: it is text, not token ids)."""
    assert build_sharing_tree([b"abc", b"abd"]).prompt(0) == (97, 98, 99)
    assert SharingTree((SharedLevel((b"ab",), (0,)),), (b"c",)).prompt(0) == (97, 98, 99)
