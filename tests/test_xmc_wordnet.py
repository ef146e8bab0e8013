"""The WordNet dataset builder (``experiments.xmc.datasets.wordnet``) on a 20-synset slice of
WordNet 3.0's ``data.noun`` (``tests/fixtures/wordnet``: a chain entity -> physical_entity
-> object -> whole -> living_thing -> organism -> person -> scientist, its siblings,
five kinds of scientist and four instances)."""

import dataclasses
import hashlib
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments.common.config_flags import ConfigError
from experiments.xmc.datasets import wordnet
from sparsejax.data.xmc import XMCFormatError, check_train_test, read_bow, read_raw_text

ROOT = pathlib.Path(__file__).parents[1]
FIXTURE_DIR = ROOT / "tests" / "fixtures" / "wordnet"
FIXTURE = FIXTURE_DIR / "data.noun"

ENTITY, PHYSICAL_ENTITY, ABSTRACTION, THING, OBJECT, WHOLE = (
  1740, 1930, 2137, 2452, 2684, 3553)
LIVING_THING, ORGANISM, CAUSAL_AGENT, PERSON = 4258, 4475, 7347, 7846
ASTRONOMER, BIOLOGIST, CHEMIST, MATHEMATICIAN, PHYSICIST, SCIENTIST = (
  9818343, 9855630, 9913824, 10301261, 10428004, 10560637)
MARIE_CURIE, PIERRE_CURIE, EINSTEIN, NEWTON = 10917703, 10917999, 10954498, 11205375
# person's ancestors: two hypernyms (organism, causal_agent) that meet at physical_entity.
ABOVE_PERSON = {ORGANISM, LIVING_THING, WHOLE, OBJECT, CAUSAL_AGENT, PHYSICAL_ENTITY, ENTITY}

# The splits of the fixture's synsets at 10 % valid and 10 % test: pinned, so a change of
# the hash (or of the key "n:offset") shows here.
VALID, TEST = {CAUSAL_AGENT}, {ENTITY, THING, SCIENTIST, EINSTEIN}


@pytest.fixture(scope="module")
def synsets():
  return wordnet.read_synsets(FIXTURE)


@pytest.fixture(scope="module")
def built(synsets):
  return wordnet.build(synsets, source=str(FIXTURE))


def _synset(offset, parents=(), instance_of=(), pos="n", line=1):
  return wordnet.Synset(offset, pos, (f"w{offset}",), tuple(parents), tuple(instance_of),
                        f"gloss of {offset}", line)


def test_read_synsets_parses_the_fixture(synsets):
  assert len(synsets) == 20 and list(synsets) == sorted(synsets)
  person = synsets[PERSON]
  assert person.pos == "n" and person.line == 12  # two license header lines, then entity
  assert person.lemmas == ("person", "individual", "someone", "somebody", "mortal", "soul")
  assert person.hypernyms == (ORGANISM, CAUSAL_AGENT) and person.instance_hypernyms == ()
  assert person.gloss == 'a human being; "there was too much for one person to do"'
  newton = synsets[NEWTON]
  assert newton.lemmas == ("Newton", "Isaac_Newton", "Sir_Isaac_Newton")
  assert newton.hypernyms == () and newton.instance_hypernyms == (MATHEMATICIAN, PHYSICIST)
  assert synsets[ENTITY].hypernyms == synsets[ENTITY].instance_hypernyms == ()
  assert synsets[ENTITY].line == 3


def test_ancestors_are_transitive_and_include_instance_hypernyms(synsets):
  closure = wordnet.ancestors(synsets)
  assert set(closure) == set(synsets)
  assert closure[ENTITY] == frozenset()
  assert closure[ABSTRACTION] == {ENTITY}
  assert closure[PERSON] == ABOVE_PERSON
  assert closure[ASTRONOMER] == {PHYSICIST, SCIENTIST, PERSON} | ABOVE_PERSON
  assert closure[EINSTEIN] == {PHYSICIST, SCIENTIST, PERSON} | ABOVE_PERSON
  assert closure[NEWTON] == {MATHEMATICIAN, PHYSICIST, SCIENTIST, PERSON} | ABOVE_PERSON


def test_ancestors_of_a_deep_chain_and_a_cycle():
  # Deeper than Python's recursion limit: the closure is iterative.
  depth = 1500
  chain = {i: _synset(i, [i - 1] if i else []) for i in range(depth)}
  closure = wordnet.ancestors(chain)
  assert closure[depth - 1] == frozenset(range(depth - 1)) and closure[0] == frozenset()
  cycle = {1: _synset(1), 2: _synset(2, [1, 4], line=7), 3: _synset(3, [2]),
           4: _synset(4, [], [3])}
  with pytest.raises(XMCFormatError, match=r"^f:\d+: hypernym cycle: .*00000002 -> .*00000002"):
    wordnet.ancestors(cycle, source="f")


def test_document_and_tokenize(synsets):
  assert wordnet.document(synsets[OBJECT]) == (
    'object, physical object: a tangible and visible entity; an entity that can cast a '
    'shadow; "it was full of rackets, balls and other objects"')
  assert wordnet.document(synsets[NEWTON]).startswith(
    "Newton, Isaac Newton, Sir Isaac Newton: English mathematician and physicist;")
  assert wordnet.tokenize("Self-contained (1642-1727); O'Neil_x Éclair") == [
    "self", "contained", "1642", "1727", "o", "neil", "x", "éclair"]


def test_split_is_pinned_deterministic_and_nested():
  keys = [f"n:{o:08d}" for o in (ENTITY, THING, CAUSAL_AGENT, PERSON, SCIENTIST, EINSTEIN)]
  got = [wordnet.split_of(k, valid_fraction=0.1, test_fraction=0.1) for k in keys]
  assert got == ["test", "test", "valid", "train", "test", "test"]
  assert got == [wordnet.split_of(k, valid_fraction=0.1, test_fraction=0.1) for k in keys]
  key = "n:00007846"
  h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
  assert wordnet.split_of(key, valid_fraction=0, test_fraction=1 - h + 1e-9) == "test"
  assert wordnet.split_of(key, valid_fraction=0, test_fraction=1 - h - 1e-9) == "train"
  # A larger validation share takes points from train only: the test split stays.
  many = [f"v:{i:08d}" for i in range(2000)]
  small = [wordnet.split_of(k, valid_fraction=0.1, test_fraction=0.1) for k in many]
  large = [wordnet.split_of(k, valid_fraction=0.3, test_fraction=0.1) for k in many]
  assert all((a == "test") == (b == "test") for a, b in zip(small, large))
  assert all(a == b or (a, b) == ("train", "valid") for a, b in zip(small, large))
  assert 0.07 < small.count("valid") / len(many) < 0.13


def test_splits_are_disjoint_stable_and_cover_every_synset(synsets, built):
  offsets = {name: set(split.offsets) for name, split in built.splits.items()}
  assert offsets["valid"] == VALID and offsets["test"] == TEST - {ENTITY}
  assert offsets["train"] == set(synsets) - VALID - TEST
  assert not (offsets["train"] & offsets["valid"] or offsets["train"] & offsets["test"]
              or offsets["valid"] & offsets["test"])
  # entity, the root, is dropped (and counted), not a point.
  assert [built.splits[s].dropped_roots for s in wordnet.SPLITS] == [0, 0, 1]
  assert all(built.splits[s].dropped_unlabelled == 0 for s in wordnet.SPLITS)
  again = wordnet.build(wordnet.read_synsets(FIXTURE))
  for name in wordnet.SPLITS:
    a, b = built.splits[name], again.splits[name]
    assert a.offsets == b.offsets and a.documents == b.documents
    for field in ("feature_indptr", "feature_ids", "feature_values", "label_indptr",
                  "label_ids"):
      assert np.array_equal(getattr(a.data, field), getattr(b.data, field))


def _labels_of(split, offset, labels):
  i = split.offsets.index(offset)
  data = split.data
  return {labels[j] for j in data.label_ids[data.label_indptr[i]:data.label_indptr[i + 1]]}


def test_labels_are_the_ancestors_of_training_points(synsets, built):
  # Ancestors of the 15 training points; abstraction and thing have no training hyponym.
  assert built.labels == tuple(sorted(ABOVE_PERSON | {PERSON, SCIENTIST, CHEMIST,
                                                     MATHEMATICIAN, PHYSICIST}))
  train, valid, test = (built.splits[s] for s in wordnet.SPLITS)
  assert _labels_of(train, NEWTON, built.labels) == (
    {MATHEMATICIAN, PHYSICIST, SCIENTIST, PERSON} | ABOVE_PERSON)
  assert _labels_of(train, ABSTRACTION, built.labels) == {ENTITY}
  assert _labels_of(train, BIOLOGIST, built.labels) == {SCIENTIST, PERSON} | ABOVE_PERSON
  assert _labels_of(valid, CAUSAL_AGENT, built.labels) == {PHYSICAL_ENTITY, ENTITY}
  assert _labels_of(test, EINSTEIN, built.labels) == {PHYSICIST, SCIENTIST, PERSON} | ABOVE_PERSON
  assert _labels_of(test, THING, built.labels) == {PHYSICAL_ENTITY, ENTITY}
  i = test.offsets.index(EINSTEIN)
  assert test.documents[i] == wordnet.document(synsets[EINSTEIN])
  assert test.documents[i].startswith("Einstein, Albert Einstein: physicist born in Germany")


def test_held_out_points_without_a_training_label_are_dropped_and_counted(synsets):
  # thing (test) moved under a new root of its own: none of its ancestors is a label.
  root = 1  # "n:00000001" falls in train, but a root is never a point
  changed = dict(synsets)
  changed[root] = _synset(root)
  changed[THING] = dataclasses.replace(synsets[THING], hypernyms=(root,))
  built = wordnet.build(changed)
  assert THING not in built.splits["test"].offsets and root not in built.labels
  assert [built.splits[s].dropped_unlabelled for s in wordnet.SPLITS] == [0, 0, 1]
  assert [built.splits[s].dropped_roots for s in wordnet.SPLITS] == [1, 0, 1]


def test_features_are_tfidf_of_the_training_vocabulary(built):
  train = built.splits["train"]
  docs = [wordnet.tokenize(d) for d in train.documents]
  df = {t: sum(t in set(d) for d in docs) for t in set().union(*docs)}
  assert built.vocabulary == tuple(sorted(t for t, n in df.items() if n >= 2))
  assert "einstein" not in built.vocabulary  # only in a test document
  n = len(docs)
  expected_idf = [math.log((1 + n) / (1 + df[t])) + 1 for t in built.vocabulary]
  np.testing.assert_allclose(built.idf, expected_idf)
  index = {t: i for i, t in enumerate(built.vocabulary)}
  for split in built.splits.values():
    data = split.data
    for i, doc in enumerate(split.documents):
      tokens = [t for t in wordnet.tokenize(doc) if t in index]
      ids = data.feature_ids[data.feature_indptr[i]:data.feature_indptr[i + 1]]
      values = data.feature_values[data.feature_indptr[i]:data.feature_indptr[i + 1]]
      assert ids.tolist() == sorted({index[t] for t in tokens})
      raw = np.array([math.log1p(tokens.count(built.vocabulary[j])) * built.idf[j] for j in ids])
      np.testing.assert_allclose(values, raw / np.linalg.norm(raw), rtol=1e-6)
  ids, values = wordnet.tfidf(["nothing", "known"], index, built.idf)
  assert ids.size == values.size == 0


def test_written_files_read_back_equal_the_build(tmp_path, synsets, built):
  stats = {**wordnet.statistics(built), "source": {"package": "p", "version": None, "files": {}}}
  wordnet.write(tmp_path, built, synsets, stats)
  read = {name: read_bow(tmp_path / f"{name}.txt") for name in wordnet.SPLITS}
  for name, split in built.splits.items():
    data = read[name]
    assert (data.num_features, data.num_labels) == (len(built.vocabulary), len(built.labels))
    for field in ("feature_indptr", "feature_ids", "feature_values", "label_indptr",
                  "label_ids"):
      assert np.array_equal(getattr(data, field), getattr(split.data, field)), (name, field)
    docs, indptr, ids = read_raw_text(tmp_path / f"{name}_text.txt",
                                      tmp_path / f"{name}_labels.txt",
                                      num_labels=len(built.labels))
    assert tuple(docs) == split.documents
    assert np.array_equal(indptr, split.data.label_indptr)
    assert np.array_equal(ids, split.data.label_ids)
    lines = (tmp_path / f"{name}_synsets.txt").read_text().splitlines()
    assert lines == [f"{o:08d}" for o in split.offsets]
  check_train_test(read["train"], read["test"])
  check_train_test(read["train"], read["valid"])
  labels = (tmp_path / "labels.txt").read_text().splitlines()
  assert len(labels) == len(built.labels)
  assert labels[built.labels.index(PERSON)] == (
    "00007846 person individual someone somebody mortal soul")
  assert json.loads((tmp_path / "stats.json").read_text()) == stats


def test_statistics(built):
  stats = wordnet.statistics(built)
  assert stats["features"] == len(built.vocabulary) and stats["labels"] == 12
  assert {s: stats["splits"][s]["points"] for s in wordnet.SPLITS} == dict(train=15, valid=1,
                                                                          test=3)
  counts = built.splits["train"].data.label_counts()
  assert stats["train_label_frequency"]["max"] == 15  # entity: every training point
  assert stats["train_label_frequency"]["min"] == counts.min() == 1
  assert stats["train_label_frequency"]["median"] == np.median(counts)
  assert stats["share_labels_under_5_train"] == np.mean(counts < 5)
  assert stats["splits"]["valid"]["mean_labels_per_point"] == 2.0


def test_cli_end_to_end(tmp_path):
  out = tmp_path / "out"
  command = [sys.executable, "-m", "experiments.xmc.datasets.wordnet", f"--out={out}",
             f"--wordnet_dir={FIXTURE_DIR}"]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Features D = 30, labels L = 12." in result.stdout
  assert "| points | 15 | 1 | 3 |" in result.stdout
  assert "| dropped: root (no hypernym) | 0 | 0 | 1 |" in result.stdout
  assert "Training points per label:" in result.stdout and "Built " in result.stdout
  stats = json.loads((out / "stats.json").read_text())
  digest = hashlib.sha256(FIXTURE.read_bytes()).hexdigest()
  assert stats["source"] == {"package": "wordnet-base", "version": None,
                             "files": {"data.noun": digest}}
  assert stats["command"].startswith("python -m experiments.xmc.datasets.wordnet --out=")
  assert stats["config"]["min_df"] == 2 and stats["synsets"] == 20
  assert sorted(p.name for p in out.iterdir()) == sorted(
    ["labels.txt", "stats.json"] + [f"{s}{suffix}" for s in wordnet.SPLITS
                                    for suffix in (".txt", "_text.txt", "_labels.txt",
                                                   "_synsets.txt")])
  # A missing source file: one line on stderr naming it, exit status 2.
  missing = subprocess.run(command[:-1] + [f"--wordnet_dir={tmp_path}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
  assert missing.returncode == 2 and str(tmp_path / "data.noun") in missing.stderr
  assert missing.stderr.count("\n") == 1


def test_verb_lines_with_frames(tmp_path):
  path = tmp_path / "data.verb"
  path.write_text(
    "  1 header  \n"
    "00001740 29 v 01 breathe 0 001 @ 00002325 v 0000 02 + 02 00 + 08 00 | draw air  \n"
    "00002325 29 v 01 respire 1 000 01 + 02 00 | undergo respiration  \n")
  got = wordnet.read_synsets(path)
  assert got[1740].hypernyms == (2325,) and got[2325].gloss == "undergo respiration"
  path.write_text("00001740 29 v 01 breathe 0 000 | draw air  \n")
  with pytest.raises(XMCFormatError, match=r"data\.verb:1: the line ends before f_cnt"):
    wordnet.read_synsets(path)


_ENTITY_LINE = "00001740 03 n 01 entity 0 000 | that which is perceived"


@pytest.mark.parametrize("line, problem", [
  ("00001740 03 n 01 entity 0 000 that which is", "no ' | ' before the gloss"),
  ("0001740 03 n 01 entity 0 000 | x", "synset_offset '0001740' (field 1) is not 8 decimal"),
  ("00001930 03 n 02 physical_entity 0 000 | x", "the line ends before lex_id (field 8)"),
  ("00001930 03 n 01 physical_entity 0 002 @ 00001740 n 0000 | x",
   "the line ends before pointer_symbol"),
  ("00001930 03 n 01 physical_entity 0 000 @ 00001740 n 0000 | x", "unexpected field '@'"),
  ("00001930 03 n 01 physical_entity 0 001 @ 00001740 v 0000 | x", "has pos v, the synset n"),
  ("00001930 03 n 01 physical_entity 0 001 @ 00009999 n 0000 | x",
   "hypernym 00009999 of synset 00001930 is not in the file"),
  ("00001930 03 n 00 000 | x", "w_cnt is 0"),
  ("00001740 03 n 01 entity 0 000 | again", "synset 00001740 repeats the one of line 2"),
  ("", "no ' | ' before the gloss"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, problem):
  path = tmp_path / "data.noun"
  path.write_text(f"  1 header  \n{_ENTITY_LINE}\n{line}\n")
  with pytest.raises(XMCFormatError) as info:
    wordnet.read_synsets(path)
  assert str(info.value).startswith(f"{path}:3: ") and problem in str(info.value)


def test_bad_files_and_settings(tmp_path, synsets):
  with pytest.raises(FileNotFoundError, match="data.noun"):
    wordnet.read_synsets(tmp_path / "data.noun")
  (tmp_path / "data.noun").write_text("  1 only a header  \n")
  with pytest.raises(XMCFormatError, match=r"data\.noun:1: no synset line"):
    wordnet.read_synsets(tmp_path / "data.noun")
  (tmp_path / "data.noun").write_bytes(_ENTITY_LINE.encode() + b"\n00001930 \xff\n")
  with pytest.raises(XMCFormatError, match=r"data\.noun:2: invalid UTF-8"):
    wordnet.read_synsets(tmp_path / "data.noun")
  with pytest.raises(ValueError, match=r"src: the test split has no point with a label"):
    wordnet.build(synsets, test_fraction=0.0, source="src")
  with pytest.raises(ValueError, match=r"no token occurs in 99 training documents"):
    wordnet.build(synsets, min_df=99)
  for bad, fragment in ((dict(out=""), "--out is required"),
                        (dict(valid_fraction=0.5, test_fraction=0.5), "must be < 1"),
                        (dict(min_df=0), "--min_df")):
    with pytest.raises(ConfigError, match=fragment):
      wordnet.check_config(dataclasses.replace(wordnet.Config(out=str(tmp_path)), **bad))
