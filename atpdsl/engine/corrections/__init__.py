"""AtP*'s corrections as plan steps, each in its own module: the QK fix (`qk_fix`), the norm fix (`norm_fix`,
atpdsl's addition) and GradDrop's terms (`graddrop_terms`), composed through the run state: a GradDrop term
asks the QK fix and the norm fix, when the plan has them, to redo their columns with the term's gradients.

All three run on the clean trace's values and gradients (GradDrop on the graph kept by
`run_trace(keep_graph=True)`); the math lives in engine/qkfix.py, engine/normfix.py and engine/graddrop.py.
"""
