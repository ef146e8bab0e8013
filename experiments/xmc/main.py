"""``python -m experiments.xmc.main``: train and evaluate an XMC model (the main job).

With no flags it trains the default ``train.Config``: an embedding-bag encoder
and a fixed fan-in (K = 32) classifier rewired by SET, over the 4,096 labels
of the default synthetic set, for 10 epochs; then it prints P@k, nDCG@k and
PSP@k. Outputs go to ``runs/xmc``; a second call there resumes (or, when the
run is complete, says so). After ``pip install`` the same job is the console
script ``sparsejax-xmc``, from any directory. ``--help`` lists the flags, one per
``train.Config`` field (``--mesh`` shards the run over devices) plus
``--coordinator``/``--num_processes``/``--process_id`` for a run over several
processes or hosts; ``python -m experiments.xmc.train`` is the same job.
"""

from . import train

if __name__ == "__main__":
  train.run_script()
