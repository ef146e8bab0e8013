"""``experiments.xmc.ablations``: rows over a base config, and tables combined over seeds."""

import subprocess
import sys

import numpy as np
import pytest

from experiments.common import config_flags
from experiments.xmc import ablations

# Small synthetic data: the "dense" row trains a 128-wide encoder for two epochs.
BASE = dict(dataset="synthetic", num_train=600, num_test=200, num_labels=60, num_features=256,
            batch_size=50, label_chunk=64, epochs=2, warmup_steps=5, eval_every=0)


def test_row_config_sets_fan_in_as_a_share_of_the_width_and_names_unknown_rows(tmp_path):
  config = ablations.row_config("sparse_wide512", BASE, tmp_path)
  assert (config.fan_in, config.embed_dim) == (64, 512)
  assert config.output_dir == str(tmp_path / "sparse_wide512")
  assert ablations.row_config("sparse_inter512", BASE, tmp_path).fan_in == 64  # 1/8 of 512
  with pytest.raises(config_flags.ConfigError, match="unknown row 'sprase'"):
    ablations.row_config("sprase", BASE, tmp_path)


def test_seeds_combine_into_means_and_gaps_paired_by_seed(tmp_path):
  tables = []
  for seed in (0, 1):
    out = tmp_path / f"seed{seed}"
    summaries = ablations.run(["popular", "dense"], {**BASE, "seed": seed}, out)
    ablations.write_tables(out, summaries, header="test")
    tables.append(ablations.read_summaries(out / "ablations.csv"))
  assert [[r["seed"] for r in t] for t in tables] == [[0, 0], [1, 1]]
  dense = [t[1] for t in tables]
  assert dense[0]["PSP@5"] != dense[1]["PSP@5"]  # the seed changed the run

  text = ablations.seed_table(tables, reference="popular")
  line = next(l for l in text.splitlines() if l.startswith("| dense |")).split(" | ")
  assert line[1] == "2"
  mean, std = (float(x) for x in line[2].split(" ± "))  # P@1
  p1 = [d["P@1"] for d in dense]
  assert mean == pytest.approx(np.mean(p1), abs=0.006)
  assert std == pytest.approx(np.std(p1, ddof=1), abs=0.006)
  gap = [d["PSP@5"] - t[0]["PSP@5"] for d, t in zip(dense, tables)]
  assert float(line[9].split(" ± ")[0]) == pytest.approx(np.mean(gap), abs=0.006)

  with pytest.raises(config_flags.ConfigError, match="no row 'dense_wide512'"):
    ablations.seed_table(tables, reference="dense_wide512")
  with pytest.raises(config_flags.ConfigError, match="one seed, not also in another"):
    ablations.seed_table([tables[0], tables[0]], reference="popular")
  other = [dict(r, base=r["base"].replace('"epochs": 2', '"epochs": 3')) for r in tables[1]]
  with pytest.raises(config_flags.ConfigError, match="differ in more than the seed"):
    ablations.seed_table([tables[0], other], reference="popular")


def test_combine_on_the_command_line_reads_tables_and_refuses_training_flags(tmp_path):
  out = tmp_path / "seed0"
  ablations.write_tables(out, ablations.run(["popular"], BASE, out), header="test")
  command = [sys.executable, "-m", "experiments.xmc.ablations", f"--combine={out}",
             "--reference=popular", f"--output_dir={tmp_path / 'all'}"]
  done = subprocess.run(command, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  assert "| popular | 1 |" in (tmp_path / "all" / "ablations_seeds.md").read_text()
  refused = subprocess.run(command + ["--rows=dense"], capture_output=True, text=True)
  assert refused.returncode == 2 and "--combine trains nothing" in refused.stderr
  refused = subprocess.run(command + [f"--combine={tmp_path / 'none'}"], capture_output=True,
                           text=True)
  assert refused.returncode == 2 and "none/ablations.csv: no such file" in refused.stderr
  (out / "ablations.csv").write_text("row,P@1\ndense,1\n")
  refused = subprocess.run(command, capture_output=True, text=True)
  assert refused.returncode == 2 and "not an ablations.csv with seed and base" in refused.stderr
