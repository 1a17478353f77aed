"""Tree-shaped drafts in a replay: a branch the linear draft misses, every node priced."""

from __future__ import annotations

import numpy as np

from das import methods
from das.bench.trace_oracle import accepted_per_source
from das.bench.tree_drafts import TreeDraftDrafter
from policies.profiles import load_cost_model, policy_cost_model

PROMPT = [11, 12, 13]
# Earlier responses of the prompt: after 1 2, three go on with 3 4 5 and one with 7 8 9.
HISTORY = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [1, 2, 7, 8, 9, 6]]


def _drafters() -> tuple:
    plan = policy_cost_model(load_cost_model("h100"))
    linear = methods.build_drafter("das_cost_model", plan, 16)
    tree = TreeDraftDrafter(linear.config, policy=linear.policy, cost=plan, max_nodes=16)
    for drafter in (linear, tree):
        drafter.begin_step(1)
        for n, response in enumerate(HISTORY):
            drafter.start_request(n, PROMPT)
            drafter.extend_many([n], [np.array(response, np.int32)])
            drafter.finish_request(n, "stop")
        drafter.begin_step(2)
        drafter.start_request("new", PROMPT)
        drafter.extend_many(["new"], [np.array([1, 2], np.int32)])
    return linear, tree


def test_a_tree_draft_holds_the_branch_the_linear_draft_misses_and_pays_for_its_nodes() -> None:
    linear, tree = _drafters()
    truth = np.array([7, 8, 9, 6, 1, 2, 3], np.int64)  # the less frequent continuation, on
    path = linear.propose(["new"]).drafts
    assert path.tokens[0, :3].tolist() == [3, 4, 5]
    assert accepted_per_source([path], [truth])[0].tolist() == [0]
    tree.truths = [truth]
    proposal = tree.propose(["new"])
    # The tree holds 3 4 5 6 and 7 8 9 6 (8 nodes); a pass verifying it accepts 7 8 9 6 and no
    # more, and the replay is handed that path with the tree's node count as its length.
    assert proposal.drafts.num_tokens.tolist() == [8]
    assert accepted_per_source([proposal.drafts], [truth])[0].tolist() == [4]
    # The accepted tokens teach the tree drafter's factor: 4 of the 8 nodes' probabilities
    # (3 x 0.75 and 3 x 0.25 of the three-token branches, then 0.75 and 0.25).
    before = tree.acceptance_factor
    tree.extend_many(["new"], [np.array([7, 8, 9, 6, 1], np.int32)])
    assert tree.accepted_tokens - 32.0 == 4
    assert tree.expected_tokens - 64.0 == 4.0
    assert tree.acceptance_factor > before


def test_a_batch_larger_than_the_tree_batch_gets_the_linear_drafts() -> None:
    _, tree = _drafters()
    tree.max_tree_batch = 0
    tree.truths = [np.array([7, 8, 9, 6])]
    assert tree.propose(["new"]).drafts.tokens[0, :3].tolist() == [3, 4, 5]
    assert tree.tree_passes == 0


def test_trees_that_accepted_more_than_their_counts_said_still_draft() -> None:
    _, tree = _drafters()
    tree.accepted_tokens = 2 * tree.expected_tokens  # a factor of 2: 0.75 x 2 capped at 1
    tree.truths = [np.array([7, 8, 9, 6])]
    assert tree.propose(["new"]).drafts.num_tokens.tolist() == [8]
