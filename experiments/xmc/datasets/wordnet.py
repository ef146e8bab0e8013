"""WordNet as an XMC dataset: a synset's words and gloss as the document, its hypernym
ancestors as the labels.

``python -m experiments.xmc.datasets.wordnet --out DIR [--wordnet_dir /usr/share/wordnet]
[--pos noun]`` reads ``data.noun`` (or ``data.verb``) of WordNet 3.0, as Debian's
``wordnet-base`` package installs it (``apt-get install wordnet-base``), and writes:

- ``train.txt``, ``valid.txt``, ``test.txt``: BoW files (``sparsejax.data.xmc.write_bow``)
  with the same header ``D`` and ``L``, so ``check_train_test`` accepts any pair;
- ``{split}_text.txt`` and ``{split}_labels.txt``: the raw text (``write_raw_text``);
- ``{split}_synsets.txt``: the synset offset of each point, one a line;
- ``labels.txt``: line ``l`` (0-based) is label ``l``'s synset offset and its words;
- ``stats.json``: the statistics the script prints, the source (package, version and
  sha256 of the file read), the command and the configuration.

How it is built (every step deterministic):

- Points: one per synset. The document is the synset's words (underscores as spaces)
  and its gloss: ``"whole, unit: an assemblage of parts ..."``.
- Labels: the synset's ancestors, the transitive closure over hypernym (``@``) and
  instance hypernym (``@i``) pointers, the synset itself excluded. The label set is
  the synsets that are an ancestor of at least one training point, numbered by
  offset; a validation or test point keeps only those. A point without labels is
  dropped, and the drops are counted per split in two kinds: roots (no hypernym,
  e.g. ``entity``) and points none of whose ancestors is a label.
- Splits: by the first 8 bytes of sha256(``"{ss_type}:{offset}"``), e.g. ``"n:00001740"``,
  read as a fraction ``h`` in ``[0, 1)``: train below ``1 - valid - test``, then
  valid, then test. A point's split depends on its synset and the fractions only;
  changing ``--valid_fraction`` moves points between train and valid, never test.
- Features: lower-cased alphanumeric tokens. The vocabulary is the tokens found in at
  least ``--min_df`` training documents (kept training points), in sorted order; a
  value is ``log(1 + tf) * idf`` with ``idf = ln((1 + N) / (1 + df)) + 1`` over the
  ``N`` training documents (always positive), rows L2-normalised. A point left
  without any feature keeps its labels and stays: dropping it would choose test
  points by their words; the count is reported per split.

Synset offsets are ids here: they are not checked against byte positions, so a
slice of a data file (the tests' fixture) reads the same way.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import json
import math
import pathlib
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from absl import flags

from ...common import config_flags
from ...common.config_flags import ConfigError
from sparsejax.data.xmc import XMCDataset, XMCFormatError, write_bow, write_raw_text

__all__ = ["Synset", "Split", "WordNetXMC", "Config", "SPLITS", "read_synsets", "ancestors",
           "document", "tokenize", "split_of", "fit_vocabulary", "tfidf", "build", "statistics",
           "format_statistics", "write", "check_config", "run", "define_flags", "main"]

SPLITS = ("train", "valid", "test")
PACKAGE = "wordnet-base"
_SS_TYPE = {"noun": "n", "verb": "v"}  # --pos -> ss_type of its data file
_QUANTILES = {"min": 0.0, "25%": 0.25, "median": 0.5, "75%": 0.75, "90%": 0.9, "99%": 0.99,
              "max": 1.0}
_RARE = 5  # labels with fewer training points than this are reported as rare
_TOKEN_RE = re.compile(r"[^\W_]+")  # runs of letters and digits
_field = config_flags.field


@dataclasses.dataclass(frozen=True)
class Synset:
  """One synset line of a WordNet data file (wndb(5WN)).

  Attributes:
    offset: ``synset_offset``, the synset's id in its file.
    pos: ``ss_type``: n, v, a, s or r.
    lemmas: its words as written, underscores joining the words of a collocation.
    hypernyms: offsets of its ``@`` pointers, in file order.
    instance_hypernyms: offsets of its ``@i`` pointers, in file order.
    gloss: the text after ``|`` (definition and examples), stripped.
    line: 1-based line number in the file, for messages.
  """
  offset: int
  pos: str
  lemmas: tuple[str, ...]
  hypernyms: tuple[int, ...]
  instance_hypernyms: tuple[int, ...]
  gloss: str
  line: int


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """The points of one split, in offset order.

  Attributes:
    offsets: the synset of each point.
    documents: the document of each point.
    data: features and labels (``D`` and ``L`` of the whole dataset).
    dropped_roots: synsets of this split without any hypernym (not points).
    dropped_unlabelled: synsets of this split none of whose ancestors is a label.
  """
  offsets: tuple[int, ...]
  documents: tuple[str, ...]
  data: XMCDataset
  dropped_roots: int
  dropped_unlabelled: int


@dataclasses.dataclass(frozen=True, eq=False)
class WordNetXMC:
  """A built dataset.

  Attributes:
    labels: the synset offset of each label id.
    vocabulary: the token of each feature id (sorted).
    idf: ``(D,)`` float64, the idf of each feature.
    splits: ``SPLITS`` -> ``Split``.
  """
  labels: tuple[int, ...]
  vocabulary: tuple[str, ...]
  idf: np.ndarray
  splits: dict[str, Split]


# ----------------------------------------------------------------------------- parsing


def _parse_line(path, number: int, line: str) -> Synset:
  """The ``Synset`` of one data line; ``XMCFormatError`` naming ``path:number`` otherwise."""
  head, bar, gloss = line.rstrip("\r\n").partition(" | ")
  if not bar:
    raise XMCFormatError(path, number, "no ' | ' before the gloss; expected 'synset_offset "
                         "lex_filenum ss_type w_cnt word lex_id ... p_cnt ... | gloss'")
  tokens = head.split()
  position = 0

  def take(what: str, pattern: str, expected: str) -> str:
    nonlocal position
    if position >= len(tokens):
      raise XMCFormatError(path, number, f"the line ends before {what} (field {position + 1})")
    token = tokens[position]
    if not re.fullmatch(pattern, token):
      raise XMCFormatError(path, number, f"{what} {token!r} (field {position + 1}) is not "
                           f"{expected}")
    position += 1
    return token

  offset = int(take("synset_offset", "[0-9]{8}", "8 decimal digits"))
  take("lex_filenum", "[0-9]{2}", "2 decimal digits")
  pos = take("ss_type", "[nvasr]", "one of n, v, a, s, r")
  w_cnt = int(take("w_cnt", "[0-9a-f]{2}", "2 hexadecimal digits"), 16)
  if w_cnt == 0:
    raise XMCFormatError(path, number, "w_cnt is 0: a synset has at least one word")
  lemmas = []
  for _ in range(w_cnt):
    lemmas.append(take("word", r"\S+", "a word"))
    take("lex_id", "[0-9a-f]", "1 hexadecimal digit")
  parents = {"@": [], "@i": []}
  for _ in range(int(take("p_cnt", "[0-9]{3}", "3 decimal digits"))):
    symbol = take("pointer_symbol", r"\S{1,2}", "a pointer symbol")
    target = int(take("pointer offset", "[0-9]{8}", "8 decimal digits"))
    target_pos = take("pointer pos", "[nvasr]", "one of n, v, a, s, r")
    take("pointer source/target", "[0-9a-f]{4}", "4 hexadecimal digits")
    if symbol in parents:
      if target_pos != pos:  # hypernyms stay within one part of speech (and one file)
        raise XMCFormatError(path, number, f"hypernym {target:08d} has pos {target_pos}, "
                             f"the synset {pos}")
      parents[symbol].append(target)
  if pos == "v":  # verb frames: f_cnt, then '+ f_num w_num' each
    for _ in range(int(take("f_cnt", "[0-9]{2}", "2 decimal digits"))):
      take("frame marker", r"\+", "'+'")
      take("f_num", "[0-9]{2}", "2 decimal digits")
      take("w_num", "[0-9a-f]{2}", "2 hexadecimal digits")
  if position != len(tokens):
    raise XMCFormatError(path, number, f"unexpected field {tokens[position]!r} (field "
                         f"{position + 1}) after the pointers; p_cnt or w_cnt is wrong")
  return Synset(offset, pos, tuple(lemmas), tuple(parents["@"]), tuple(parents["@i"]),
                gloss.strip(), number)


def read_synsets(path) -> dict[int, Synset]:
  """Reads a WordNet data file (``data.noun``, ``data.verb``, ...).

  Lines starting with two spaces (the license header) are skipped; every other
  line must be a synset. Each hypernym pointer must name a synset of the file.

  Arguments:
    path: the data file.

  Returns:
    offset -> ``Synset``, in file order.

  Raises:
    OSError: the file cannot be read.
    XMCFormatError: ``path:line: problem`` for a malformed line, a repeated
      offset, a hypernym missing from the file, or a file without synsets.
  """
  synsets: dict[int, Synset] = {}
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      if raw.startswith(b"  "):
        continue
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise XMCFormatError(path, number, f"invalid UTF-8 at byte {e.start + 1}") from None
      synset = _parse_line(path, number, line)
      if synset.offset in synsets:
        raise XMCFormatError(path, number, f"synset {synset.offset:08d} repeats the one of line "
                             f"{synsets[synset.offset].line}")
      synsets[synset.offset] = synset
  if not synsets:
    raise XMCFormatError(path, 1, "no synset line (only license header lines or nothing)")
  for synset in synsets.values():
    for target in synset.hypernyms + synset.instance_hypernyms:
      if target not in synsets:
        raise XMCFormatError(path, synset.line, f"hypernym {target:08d} of synset "
                             f"{synset.offset:08d} is not in the file")
  return synsets


def ancestors(synsets: Mapping[int, Synset], *, source: str = "synsets"
              ) -> dict[int, frozenset[int]]:
  """Every synset's ancestors: the transitive closure over hypernyms and instance hypernyms.

  Iterative (no recursion limit on deep chains) and memoised: each synset's set
  is computed once, from its parents' sets.

  Arguments:
    synsets: offset -> ``Synset``, as ``read_synsets`` returns.
    source: the file name that messages give.

  Returns:
    offset -> the offsets of its ancestors (empty for a root), the synset excluded.

  Raises:
    XMCFormatError: a hypernym cycle (naming the synsets on it) or a hypernym
      missing from ``synsets``.
  """
  closure: dict[int, frozenset[int]] = {}
  for start in sorted(synsets):
    if start in closure:
      continue
    path = {start: None}  # the synsets being expanded, in order (a dict keeps it)
    stack = [start]
    while stack:
      synset = synsets[stack[-1]]
      parents = synset.hypernyms + synset.instance_hypernyms
      pending = [p for p in parents if p not in closure]
      for parent in pending:
        if parent not in synsets:
          raise XMCFormatError(source, synset.line, f"hypernym {parent:08d} of synset "
                               f"{synset.offset:08d} is not in the file")
        if parent in path:
          cycle = list(path)[list(path).index(parent):] + [parent]
          raise XMCFormatError(source, synset.line, "hypernym cycle: "
                               + " -> ".join(f"{o:08d}" for o in cycle))
      if pending:
        path[pending[0]] = None
        stack.append(pending[0])
        continue
      closure[synset.offset] = frozenset(parents).union(*(closure[p] for p in parents))
      del path[stack.pop()]
  return closure


def document(synset: Synset) -> str:
  """The synset's words (underscores as spaces) and gloss: ``"whole, unit: an assemblage ..."``."""
  return ", ".join(lemma.replace("_", " ") for lemma in synset.lemmas) + ": " + synset.gloss


def tokenize(text: str) -> list[str]:
  """The tokens of a text: lower-cased runs of letters and digits.

  Arguments:
    text: a document.

  Returns:
    The tokens in order, repeats kept: ``"Self-contained (1642)"`` gives
    ``["self", "contained", "1642"]``.
  """
  return _TOKEN_RE.findall(text.lower())


def split_of(key: str, *, valid_fraction: float, test_fraction: float) -> str:
  """The split of a point: ``"train"``, ``"valid"`` or ``"test"``, from a stable hash.

  Arguments:
    key: the point's name, ``"{ss_type}:{offset:08d}"``.
    valid_fraction, test_fraction: the expected shares of the two held-out splits.

  Returns:
    The split of ``h``, the first 8 bytes of sha256(``key``) over ``2**64``:
    train below ``1 - valid - test``, test from ``1 - test`` on, valid between.
  """
  h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
  if h < 1.0 - valid_fraction - test_fraction:
    return "train"
  return "valid" if h < 1.0 - test_fraction else "test"


# ----------------------------------------------------------------------------- features


def fit_vocabulary(token_lists: Sequence[Sequence[str]], min_df: int
                   ) -> tuple[tuple[str, ...], np.ndarray]:
  """The vocabulary and idf of training documents.

  Arguments:
    token_lists: the tokens of each training document.
    min_df: the fewest documents a token must occur in to be a feature.

  Returns:
    ``(vocabulary, idf)``: the tokens in sorted order and ``(D,)`` float64
    ``ln((1 + N) / (1 + df)) + 1`` for ``N`` documents.
  """
  df = collections.Counter(token for tokens in token_lists for token in set(tokens))
  vocabulary = tuple(sorted(token for token, count in df.items() if count >= min_df))
  n = len(token_lists)
  idf = np.array([math.log((1 + n) / (1 + df[token])) + 1 for token in vocabulary], np.float64)
  return vocabulary, idf


def tfidf(tokens: Sequence[str], index: Mapping[str, int], idf: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
  """The features of one document: ``log(1 + tf) * idf``, L2-normalised.

  Arguments:
    tokens: the document's tokens.
    index: token -> feature id; other tokens are left out.
    idf: ``(D,)`` idf of each feature id.

  Returns:
    ``(ids, values)``: sorted ``int32`` feature ids and their ``float32`` values;
    both empty when no token is in ``index``.
  """
  counts = collections.Counter(index[t] for t in tokens if t in index)
  if not counts:
    return np.zeros(0, np.int32), np.zeros(0, np.float32)
  ids = np.array(sorted(counts), np.int64)
  values = np.log1p(np.array([counts[i] for i in ids.tolist()], np.float64)) * idf[ids]
  return ids.astype(np.int32), (values / np.linalg.norm(values)).astype(np.float32)


# ----------------------------------------------------------------------------- dataset


def build(synsets: Mapping[int, Synset], *, valid_fraction: float = 0.1,
          test_fraction: float = 0.1, min_df: int = 2, source: str = "synsets") -> WordNetXMC:
  """The XMC dataset of ``synsets`` (see the module docstring for the rules).

  Arguments:
    synsets: offset -> ``Synset``, as ``read_synsets`` returns.
    valid_fraction, test_fraction: shares of the held-out splits (``split_of``).
    min_df: the fewest training documents a feature token occurs in.
    source: the file name that messages give.

  Returns:
    The ``WordNetXMC``: labels, vocabulary, idf and the three splits.

  Raises:
    XMCFormatError: from ``ancestors``.
    ValueError: no label, no feature or an empty split, naming ``source``.
  """
  closure = ancestors(synsets, source=source)
  members = {name: [] for name in SPLITS}
  for offset in sorted(synsets):
    key = f"{synsets[offset].pos}:{offset:08d}"
    members[split_of(key, valid_fraction=valid_fraction, test_fraction=test_fraction)].append(
      offset)
  labels = tuple(sorted(set().union(*(closure[o] for o in members["train"]))))
  if not labels:
    raise ValueError(f"{source}: no training synset has a hypernym, so there is no label")
  label_index = {offset: i for i, offset in enumerate(labels)}

  kept, drops = {}, {}
  for name in SPLITS:
    points, roots, unlabelled = [], 0, 0
    for offset in members[name]:
      ids = sorted(label_index[a] for a in closure[offset] if a in label_index)
      if not closure[offset]:
        roots += 1
      elif not ids:  # only held-out points: a training point's ancestors are all labels
        unlabelled += 1
      else:
        text = document(synsets[offset])
        points.append((offset, text, tokenize(text), np.array(ids, np.int32)))
    if not points:
      raise ValueError(f"{source}: the {name} split has no point with a label ({roots} roots "
                       f"and {unlabelled} unlabelled synsets dropped); raise its fraction")
    kept[name], drops[name] = points, (roots, unlabelled)

  vocabulary, idf = fit_vocabulary([tokens for _, _, tokens, _ in kept["train"]], min_df)
  if not vocabulary:
    raise ValueError(f"{source}: no token occurs in {min_df} training documents, so there is "
                     "no feature; lower --min_df")
  index = {token: i for i, token in enumerate(vocabulary)}
  splits = {}
  for name, points in kept.items():
    rows = ((ids, *tfidf(tokens, index, idf)) for _, _, tokens, ids in points)
    splits[name] = Split(tuple(p[0] for p in points), tuple(p[1] for p in points),
                         XMCDataset.from_rows(rows, len(vocabulary), len(labels)), *drops[name])
  return WordNetXMC(labels, vocabulary, idf, splits)


def statistics(dataset: WordNetXMC) -> dict:
  """The dataset's statistics, as ``stats.json`` holds them (less source and command).

  Returns:
    ``features`` (D), ``labels`` (L); ``splits``: per split, the points, the
    dropped synsets (roots, unlabelled), the points without features, and the
    mean and max labels and features per point; ``train_label_frequency``: the
    quantiles of the training points per label; ``share_labels_under_5_train``.
  """
  splits = {}
  for name, split in dataset.splits.items():
    data = split.data
    features = np.diff(data.feature_indptr)
    splits[name] = {
      "points": len(data), "dropped_roots": split.dropped_roots,
      "dropped_unlabelled": split.dropped_unlabelled,
      "points_without_features": int(np.sum(features == 0)),
      "mean_labels_per_point": float(np.mean(np.diff(data.label_indptr))),
      "mean_features_per_point": float(np.mean(features)),
      "max_labels_per_point": data.max_labels_per_point(),
      "max_features_per_point": data.max_features_per_point()}
  counts = dataset.splits["train"].data.label_counts()
  quantiles = np.quantile(counts, list(_QUANTILES.values()))
  return {"features": len(dataset.vocabulary), "labels": len(dataset.labels), "splits": splits,
          "train_label_frequency": dict(zip(_QUANTILES, map(float, quantiles))),
          "share_labels_under_5_train": float(np.mean(counts < _RARE))}


def format_statistics(stats: Mapping) -> str:
  """``stats.json``'s content as markdown: the source, a table per split, the label frequency."""
  source = stats["source"]
  files = ", ".join(f"`{name}` sha256 `{digest}`" for name, digest in source["files"].items())
  lines = [f"Source: {source['package']} {source['version'] or '(version unknown)'}: {files}",
           "", f"Features D = {stats['features']:,}, labels L = {stats['labels']:,}.", "",
           "| | " + " | ".join(SPLITS) + " |", "|---|" + "---|" * len(SPLITS)]
  rows = (("points", "points", "{:,}"), ("dropped: root (no hypernym)", "dropped_roots", "{:,}"),
          ("dropped: no training label", "dropped_unlabelled", "{:,}"),
          ("points without features (kept)", "points_without_features", "{:,}"),
          ("mean labels / point", "mean_labels_per_point", "{:.2f}"),
          ("max labels / point", "max_labels_per_point", "{:,}"),
          ("mean features / point", "mean_features_per_point", "{:.2f}"),
          ("max features / point", "max_features_per_point", "{:,}"))
  for title, key, form in rows:
    lines.append(f"| {title} | " + " | ".join(form.format(stats["splits"][s][key]) for s in SPLITS)
                 + " |")
  frequency = stats["train_label_frequency"]
  lines += ["", "Training points per label:", "", "| " + " | ".join(frequency) + " |",
            "|" + "---|" * len(frequency),
            "| " + " | ".join(f"{v:g}" for v in frequency.values()) + " |", "",
            f"Labels with fewer than {_RARE} training points: "
            f"{100 * stats['share_labels_under_5_train']:.1f} %."]
  return "\n".join(lines)


def write(out, dataset: WordNetXMC, synsets: Mapping[int, Synset], stats: Mapping) -> None:
  """Writes the dataset's files (module docstring) and ``stats.json`` into ``out`` (created)."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  for name, split in dataset.splits.items():
    write_bow(out / f"{name}.txt", split.data)
    write_raw_text(out / f"{name}_text.txt", out / f"{name}_labels.txt", split.documents,
                   split.data.label_indptr, split.data.label_ids)
    (out / f"{name}_synsets.txt").write_text("".join(f"{o:08d}\n" for o in split.offsets),
                                             encoding="ascii")
  with open(out / "labels.txt", "w", encoding="utf-8", newline="\n") as f:
    f.writelines(f"{o:08d} {' '.join(synsets[o].lemmas)}\n" for o in dataset.labels)
  (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")


def _debian_version(wordnet_dir: pathlib.Path) -> str | None:
  """The package version from the Debian changelog installed beside the data, if any."""
  changelog = wordnet_dir.parent / "doc" / PACKAGE / "changelog.Debian.gz"
  if not changelog.is_file():
    return None
  with gzip.open(changelog, "rt", encoding="utf-8") as f:
    match = re.match(r"\S+ \(([^)]+)\)", f.readline())  # "wordnet (1:3.0-37) unstable; ..."
  return match.group(1) if match else None


# ----------------------------------------------------------------------------- the script


@dataclasses.dataclass(frozen=True)
class Config:
  """The build's settings: one absl flag per field."""
  out: str = _field("", "output directory (created; files in it are overwritten)")
  wordnet_dir: str = _field("/usr/share/wordnet", "directory of WordNet 3.0's data files, as "
                            "Debian's wordnet-base installs them")
  pos: str = _field("noun", "part of speech: its data.<pos> file is read", choices=tuple(_SS_TYPE))
  valid_fraction: float = _field(0.1, "expected share of synsets in the validation split",
                                 at_least=0, at_most=1)
  test_fraction: float = _field(0.1, "expected share of synsets in the test split", at_least=0,
                                at_most=1)
  min_df: int = _field(2, "fewest training documents a token must occur in to be a feature",
                       at_least=1)


def check_config(config: Config) -> None:
  """``config_flags.check``, a given ``--out`` and room left for training."""
  config_flags.check(config)
  if not config.out:
    raise ConfigError("--out is required: the directory to write the dataset to")
  if config.valid_fraction + config.test_fraction >= 1:
    raise ConfigError(f"--valid_fraction + --test_fraction must be < 1 (the rest is training), "
                      f"got {config.valid_fraction} + {config.test_fraction}")


def run(config: Config, *, command: str | None = None,
        report: Callable[[str], None] = print) -> dict:
  """Builds the dataset of ``config``, writes it and reports its statistics.

  Arguments:
    config: the settings.
    command: the command line, recorded in ``stats.json``.
    report: called with the statistics (markdown) and the build time.

  Returns:
    The content of ``stats.json``.
  """
  check_config(config)
  start = time.perf_counter()
  wordnet_dir = pathlib.Path(config.wordnet_dir)
  path = wordnet_dir / f"data.{config.pos}"
  synsets = read_synsets(path)
  for synset in synsets.values():
    if synset.pos != _SS_TYPE[config.pos]:
      raise XMCFormatError(path, synset.line, f"ss_type {synset.pos} in the {config.pos} file")
  dataset = build(synsets, valid_fraction=config.valid_fraction,
                  test_fraction=config.test_fraction, min_df=config.min_df, source=str(path))
  stats = {"source": {"package": PACKAGE, "version": _debian_version(wordnet_dir),
                      "files": {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}},
           "command": command, "config": dataclasses.asdict(config), "synsets": len(synsets),
           **statistics(dataset)}
  write(config.out, dataset, synsets, stats)
  report(format_statistics(stats))
  report(f"\nBuilt {config.out} from {len(synsets):,} synsets in "
         f"{time.perf_counter() - start:.1f} s.")
  return stats


def define_flags() -> None:
  """One absl flag per ``Config`` field, and ``--debug``."""
  config_flags.define_flags(Config)
  flags.DEFINE_boolean("debug", False, "on an error, print its traceback (default: one line)")


def main(argv) -> None:
  del argv
  command = shlex.join(["python", "-m", "experiments.xmc.datasets.wordnet", *sys.argv[1:]])
  with config_flags.one_line_errors(debug=flags.FLAGS.debug):
    run(config_flags.config_from_flags(Config), command=command)


def run_script() -> None:
  """The console script: parses the flags and runs ``main``."""
  config_flags.launch(define_flags, main)


if __name__ == "__main__":
  run_script()
