"""micromoe.train: training a MoE transformer with plain EP or MicroEP (`micromoe train`).

Owns the data pipeline (`data`), the resolved run configuration (`config`), the process layout
with one placement and process groups per MoE layer (`parallel`), building and checkpointing a run
(`trainer`, `checkpoint`), the step loop (`loop`), per-step metrics (`metrics`), the end-of-run
report (`report`), the adaptive-replacement hook (`replacement`) and the command (`command`).
"""
