"""Tree mode and Hybrid Tree Attention verification, opt-in: imported only
by an engine with `tree` or `hybrid_tree_attention` on (a chain engine
without HTA never loads it). The drafter grows trees in the draft
(`drafting`), the runner's step plans and accepts them (`verification`),
the target's attention layers verify with HTA (`backend`); what one step
hands from one to the next is in the proposer's `StepRecord`
(`vllm_glue.step`)."""
