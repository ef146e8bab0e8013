"""``python -m experiments.fanin_demo.main``: train the fixed fan-in demo classifier."""

import dataclasses

from absl import app, flags

from experiments.fanin_demo import train

# One flag per train.Config field, with the field's default.
_DEFINE = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}
for _field in dataclasses.fields(train.Config):
  _default = getattr(train.Config(), _field.name)
  _DEFINE[type(_default)](_field.name, _default, f"Config.{_field.name}")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = train.Config(**{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(train.Config)})
  history = train.train(config)
  print(f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}; "
        f"metrics in {config.output_dir}/metrics.csv")


if __name__ == "__main__":
  app.run(main)
