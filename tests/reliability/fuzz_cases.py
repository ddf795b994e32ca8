"""Hypothesis strategies of bad ``fastllm`` command lines, each wrong in exactly one place.

A case is a :class:`Case`: an argv plus the files to write first. Paths are written with markers
(``@RUN@``, ``@D@`` for the case's own directory, ...) that the test replaces by the world's paths,
so the strategies need no world to be built. Every generator keeps the rest of the command valid,
so the one bad piece is what must be refused.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import typing
from dataclasses import dataclass

from hypothesis import strategies as st

from fastllm.config import _FALSE_WORDS, _NONE_WORDS, _TRUE_WORDS
from fastllm.train.config import Config

MARKERS = ("@RUN@", "@STEP@", "@SHARDED@", "@FASTLLM@", "@HF@", "@DATA@", "@TOKENIZER@", "@OTHER_TOKENIZER@",
           "@CORPUS@", "@RECIPE@", "@D@")


@dataclass(frozen=True)
class Case:
    kind: str
    argv: tuple[str, ...]
    files: tuple[tuple[str, bytes], ...] = ()  # (path under @D@, content)
    copies: tuple[tuple[str, str], ...] = ()  # (world marker, path under @D@): copied before the files


# --- values ----------------------------------------------------------------------------------
_printable = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)


def _is_number(text: str) -> bool:
    for parse in (lambda s: float(s.replace("_", "")), lambda s: int(s.replace("_", ""), 0)):
        try:
            parse(text)
            return True
        except ValueError:
            pass
    return False


_NON_NUMBERS = st.one_of(
    st.sampled_from(["abc", "1..2", "0x", "--1", "1e", "nan", "inf", "-inf", "NaN", "1e999", "-1e999", "[1",
                     "{}", "one", "", " ", "1,2,3", "0.1.2", "1/2", "1_000_.5"]),
    _printable.filter(lambda s: not _is_number(s) and s.strip().lower() not in _NONE_WORDS),
)

def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


binary_junk = st.binary(min_size=1, max_size=64).filter(_not_utf8)


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """(dotted key, annotated type) of every leaf field of a config dataclass."""
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        if name not in {f.name for f in dataclasses.fields(cls) if f.init}:
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp
        if dataclasses.is_dataclass(inner):
            out += _leaves(inner, f"{prefix}{name}.")
        else:
            out.append((prefix + name, inner))
    return out


def _kind(tp) -> str:
    if tp is bool:
        return "bool"
    if typing.get_origin(tp) is typing.Literal:
        return "literal"
    if tp in (int, float) or tp == typing.Union[float, int] or tp == tuple[float, float]:
        return "number"
    return "other"


LEAVES = _leaves(Config)
_TYPED = [(key, tp) for key, tp in LEAVES if _kind(tp) != "other"]
_SECTIONS = sorted({key.rsplit(".", 1)[0] for key, _ in LEAVES if "." in key}
                   | {key.split(".")[0] for key, _ in LEAVES})


@st.composite
def bad_typed_value(draw) -> str:
    key, tp = draw(st.sampled_from(_TYPED))
    kind = _kind(tp)
    if kind == "number":
        text = draw(_NON_NUMBERS)
    elif kind == "bool":
        words = {*_TRUE_WORDS, *_FALSE_WORDS, *_NONE_WORDS}
        text = draw(st.one_of(st.sampled_from(["maybe", "2", "-1", "yes please", "truee"]), _printable)
                    .filter(lambda s: s.strip().lower() not in words))
    else:
        choices = {str(c) for c in typing.get_args(tp)} | {str(c).lower() for c in typing.get_args(tp)}
        text = draw(_printable.filter(lambda s: s not in choices and s.strip().lower() not in _NONE_WORDS))
    return f"{key}={text}"


# (key, strategy of values every one of which the config must refuse); the recipe trains 2 steps
_OUT_OF_RANGE = [
    ("train.steps", st.integers(max_value=0)), ("train.micro_batch_size", st.integers(max_value=0)),
    ("train.grad_accum", st.integers(max_value=0)), ("train.log_every", st.integers(max_value=0)),
    ("train.eval_every", st.integers(max_value=-1)), ("train.keep_checkpoints", st.integers(max_value=0)),
    ("train.grad_clip", st.floats(max_value=0, allow_nan=False)),
    ("optim.lr", st.floats(max_value=0, allow_nan=False)), ("optim.eps", st.floats(max_value=0, allow_nan=False)),
    ("optim.weight_decay", st.floats(max_value=-1e-9, allow_nan=False)),
    ("optim.min_lr_ratio", st.floats(min_value=1.0001, allow_nan=False, allow_infinity=False)),
    ("optim.warmup_steps", st.one_of(st.integers(max_value=-1), st.integers(min_value=4))),
    ("data.seq_len", st.one_of(st.integers(max_value=0), st.integers(min_value=65))),
    ("data.validation_fraction", st.one_of(st.floats(min_value=1, allow_nan=False, allow_infinity=False),
                                           st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False))),
    ("data.prefetch", st.integers(max_value=-1)), ("model.vocab_size", st.integers(max_value=0)),
    ("model.n_heads", st.sampled_from([3, 5, 7, 0, -4])), ("mesh.data", st.integers(max_value=0)),
    ("sample.temperature", st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)),
    ("sample.top_k", st.integers(max_value=0)), ("sample.top_p", st.floats(min_value=1.0001, allow_nan=False)),
    ("zero.stage", st.integers(min_value=4)), ("run.device", st.sampled_from(["tpu", "gpu", "", "mps"])),
    ("model.preset", st.sampled_from(["gpt5", "", "llama", "tiny"])), ("model.family", st.sampled_from(["bert", "t5"])),
]


@st.composite
def out_of_range(draw) -> str:
    key, values = draw(st.sampled_from(_OUT_OF_RANGE))
    return f"{key}={draw(values)}"


def _is_key_path(key: str) -> bool:
    return any(k == key or k.startswith(key + ".") for k, _ in LEAVES)


unknown_key = st.builds(
    lambda section, leaf: f"{section + '.' if section else ''}{leaf}=1",
    st.sampled_from(["", *_SECTIONS]), st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True),
).filter(lambda text: not _is_key_path(text.split("=")[0]))

malformed = st.one_of(st.sampled_from(["train.steps", "=3", " =1", "optim", "optim=3", "train=1", "model.rope=2"]),
                      _printable.filter(lambda s: "=" not in s and not s.startswith("-") and s.strip() != ""))

GOOD_OVERRIDES = st.lists(st.sampled_from(["train.steps=3", "optim.lr=0.01", "train.log_every=2", "data.seq_len=16",
                                           "sample.temperature=0.5", "model.n_layers=2"]), max_size=2)


@st.composite
def override_case(draw) -> Case:
    bad = draw(st.one_of(bad_typed_value(), out_of_range(), unknown_key, malformed))
    good = [g for g in draw(GOOD_OVERRIDES) if g.split("=")[0] != bad.split("=")[0]]  # the last value wins
    position = draw(st.integers(0, len(good)))
    overrides = [*good[:position], bad, *good[position:]]
    flag_first = draw(st.booleans())
    argv = ["train", "@RECIPE@", *(["--print-config"] if flag_first else []), *overrides,
            *([] if flag_first else ["--print-config"])]
    return Case("override", tuple(argv))


# --- recipes ---------------------------------------------------------------------------------
_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                   max_size=3), max_leaves=5)
junk_file = st.one_of(binary_junk, _VALUES.map(lambda v: json.dumps(v).encode()))  # binary, or JSON of any shape


@st.composite
def recipe_case(draw) -> Case:
    valid = "from fastllm.train.config import Config, TrainSection\n\ndef config():\n    return Config(\n" \
            "        train=TrainSection(steps=2),\n    )\n"
    text = st.one_of(
        st.builds(lambda cut: valid[:cut], st.integers(0, len(valid) - 3)),  # cut short: never complete
        st.builds(lambda v: f"def config():\n    return {v!r}\n", _VALUES),  # not a config dataclass
        st.builds(lambda d: valid.replace("steps=2", f"steps={d}"), st.integers(max_value=0)),
        st.sampled_from(["def config():\n    return undefined_name\n", "import no_such_module_xyz\n",
                         "def config():\n    raise ValueError('bad')\n", "config = 3\n", ""]),
    )
    data = draw(st.one_of(text.map(str.encode), binary_junk))
    name = draw(st.sampled_from(["recipe.py", "r.py", "recipe.txt"]))
    return Case("recipe", ("train", f"@D@/{name}", *draw(GOOD_OVERRIDES)), files=((name, data),))


# --- files -----------------------------------------------------------------------------------
_records_without_text = st.one_of(
    st.dictionaries(st.text(max_size=6).filter(lambda k: k != "text"), _VALUES, max_size=3),
    st.fixed_dictionaries({"text": _VALUES.filter(lambda v: not isinstance(v, str))}),
    _VALUES.filter(lambda v: not isinstance(v, dict)),
)
_GOOD_LINE = json.dumps({"text": "w1 w2 w3"})


@st.composite
def bad_jsonl(draw) -> tuple[str, bytes, bool]:
    """(file name, content, empty): an input that cannot give a document stream; ``empty`` when it
    is bad only for holding no document (so it must be the only input)."""
    kind = draw(st.sampled_from(["binary", "schema", "truncated", "empty", "gzip-junk", "gzip-cut", "parquet"]))
    if kind == "binary":
        return "in.jsonl", draw(binary_junk), False
    if kind == "schema":
        lines = draw(st.lists(_records_without_text, min_size=1, max_size=3))
        good = draw(st.integers(0, 2))
        return "in.jsonl", ("\n".join([_GOOD_LINE] * good + [json.dumps(r) for r in lines]) + "\n").encode(), False
    if kind == "truncated":
        line = json.dumps({"text": draw(st.text(min_size=1, max_size=8))})
        return "in.jsonl", (_GOOD_LINE + "\n" + line[:draw(st.integers(1, len(line) - 1))]).encode(), False
    if kind == "empty":
        return "in.jsonl", draw(st.sampled_from([b"", b"\n\n", b'{"text": ""}\n', b'{"text": ""}\n\n'])), True
    if kind == "gzip-junk":
        return "in.jsonl.gz", draw(st.binary(max_size=40)), True  # b"" is an empty gzip stream
    if kind == "gzip-cut":
        whole = gzip.compress((_GOOD_LINE + "\n").encode() * 5)
        return "in.jsonl.gz", whole[:draw(st.integers(0, len(whole) - 9))], True  # the trailer is 8 bytes
    return "in.parquet", draw(st.binary(max_size=40)), False


@st.composite
def bad_tokenizer(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["binary", "json", "cut"]))
    if kind == "binary":
        return "tok.json", draw(binary_junk)
    if kind == "json":
        return "tok.json", json.dumps(draw(_VALUES)).encode()
    real = json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "w1": 1},
                                                   "unk_token": "[UNK]"}})
    return "tok.json", real[:draw(st.integers(1, len(real) - 1))].encode()


def _bad_int_flag() -> st.SearchStrategy[str]:
    return st.one_of(st.integers(max_value=0).map(str), _NON_NUMBERS)


@st.composite
def prepare_case(draw) -> Case:
    inputs, tokenizer, output = ["@CORPUS@"], "@TOKENIZER@", "@D@/out"
    flags, files = ["--workers", "1", "--quiet"], []
    bad = draw(st.sampled_from(["input", "tokenizer", "missing", "flag", "eos", "existing", "file-output"]))
    if bad == "input":
        name, data, empty = draw(bad_jsonl())
        files.append((name, data))
        inputs = [f"@D@/{name}"] if empty else draw(st.sampled_from([[f"@D@/{name}"], ["@CORPUS@", f"@D@/{name}"]]))
    elif bad == "tokenizer":
        name, data = draw(bad_tokenizer())
        files.append((name, data))
        tokenizer = f"@D@/{name}"
    elif bad == "missing":
        which = draw(st.sampled_from(["input", "tokenizer"]))
        inputs, tokenizer = (["@D@/nope.jsonl"], tokenizer) if which == "input" else (inputs, "@D@/nope.json")
    elif bad == "flag":
        flag = draw(st.sampled_from(["--workers", "--shard-tokens", "--text-mode"]))
        value = draw(_printable.filter(lambda s: s not in ("file", "line"))) if flag == "--text-mode" \
            else draw(_bad_int_flag())
        flags = (["--quiet"] if flag == "--workers" else flags) + [f"{flag}={value}"]
    elif bad == "eos":
        not_in_vocab = _printable.filter(lambda s: s and not s.startswith("w") and s not in ("[UNK]", "[EOS]"))
        flags += [f"--eos-token={draw(not_in_vocab)}"]
    elif bad == "existing":  # a bad input onto the world's dataset: it must survive, --overwrite or not
        name, data, _ = draw(bad_jsonl())
        files.append((name, data))
        inputs, output = [f"@D@/{name}"], "@DATA@"
        flags += ["--overwrite"] if draw(st.booleans()) else []
    else:
        output = "@CORPUS@"
    return Case("prepare", ("prepare", *inputs, "--tokenizer", tokenizer, "--output", output, *flags),
                files=tuple(files))


# --- model directories -----------------------------------------------------------------------
_MODEL_FILES = {"@HF@": ["config.json", "model.safetensors", "tokenizer.json"],
                "@FASTLLM@": ["fastllm.json", "model.safetensors", "tokenizer.json"],
                "@STEP@": ["COMPLETE", "metadata.json", "params.safetensors"],
                "@SHARDED@": ["COMPLETE", "sharded.json", "shard-00000.safetensors"]}


@st.composite
def bad_model_dir(draw) -> tuple[str, tuple, tuple]:
    """(path, copies, files): a copy of a world model with one file cut short, replaced or missing,
    or a directory of junk."""
    kind = draw(st.sampled_from(["cut", "junk-file", "missing-file", "junk-dir", "nothing"]))
    if kind == "junk-dir":
        name = draw(st.sampled_from(["config.json", "fastllm.json", "metadata.json", "sharded.json"]))
        return "@D@/m", (), ((f"m/{name}", draw(junk_file)),)
    if kind == "nothing":
        return draw(st.sampled_from(["@D@/nope", "@CORPUS@", "@D@"])), (), ()
    source = draw(st.sampled_from(sorted(_MODEL_FILES)))
    name = draw(st.sampled_from(_MODEL_FILES[source]))
    if kind == "missing-file" and name != "tokenizer.json":  # a model without a tokenizer still converts
        return "@D@/m", ((source, "m"),), ((f"m/{name}", None),)
    if kind == "junk-file":
        return "@D@/m", ((source, "m"),), ((f"m/{name}", draw(binary_junk)),)
    return "@D@/m", ((source, "m"),), ((f"m/{name}", ("cut", draw(st.integers(0, 10_000)))),)


@st.composite
def convert_case(draw) -> Case:
    bad = draw(st.sampled_from(["source", "destination", "flag"]))
    src, dst, flags, copies, files = "@RUN@", "@D@/out", [], (), ()
    if bad == "source":
        src, copies, files = draw(bad_model_dir())
    elif bad == "destination":  # a valid source onto something that exists: it must survive
        src = draw(st.sampled_from(["@RUN@", "@HF@", "@FASTLLM@"]))
        dst = draw(st.sampled_from(["@RUN@", "@HF@", "@FASTLLM@", "@DATA@", "@CORPUS@"]))
    else:
        flag = draw(st.sampled_from(["--to", "--dtype", "--max-shard-bytes"]))
        value = draw(_bad_int_flag()) if flag == "--max-shard-bytes" else \
            draw(_printable.filter(lambda s: s not in ("hf", "fastllm", "float32", "bfloat16", "float16")))
        flags = [f"{flag}={value}"]
    return Case("convert", ("convert", src, dst, *flags), copies=copies, files=files)


_GEN_FLAGS = {
    "--temperature": st.one_of(st.floats(max_value=-1e-9).map(repr), st.sampled_from(["nan", "inf", "-0.5x"]),
                               _NON_NUMBERS.filter(lambda s: s not in ("",) and not _is_number(s))),
    "--top-k": _bad_int_flag(),
    "--top-p": st.one_of(st.floats(max_value=0).map(repr), st.floats(min_value=1.0000001).map(repr),
                         st.sampled_from(["nan", "p"])),
    "--max-new-tokens": st.one_of(_bad_int_flag(), st.integers(min_value=64).map(str)),
    "--seed": st.one_of(st.integers(max_value=-1).map(str), _NON_NUMBERS),
    "--device": st.sampled_from(["tpu", "cuda:x", "gpu", "", "meta", "cuda"]),
}


@st.composite
def generate_case(draw) -> Case:
    bad = draw(st.sampled_from(["flag", "flag", "prompt", "source", "tokenizer"]))
    src, prompt, flags, copies, files = "@RUN@", "w1 w2", ["--max-new-tokens", "2"], (), ()
    if bad == "flag":
        flag = draw(st.sampled_from(sorted(_GEN_FLAGS)))
        flags = [f for f in flags if flag != "--max-new-tokens"] + [f"{flag}={draw(_GEN_FLAGS[flag])}"]
    elif bad == "prompt":
        prompt = draw(st.text(st.sampled_from(" \t\n\r"), max_size=4))
    elif bad == "source":
        src, copies, files = draw(bad_model_dir())
    else:
        choice = draw(st.sampled_from(["other", "junk", "missing"]))
        if choice == "junk":
            name, data = draw(bad_tokenizer())
            files = ((name, data),)
            flags += ["--tokenizer", f"@D@/{name}"]
        else:
            flags += ["--tokenizer", "@OTHER_TOKENIZER@" if choice == "other" else "@D@/nope.json"]
    return Case("generate", ("generate", src, f"--prompt={prompt}", *flags), copies=copies, files=files)


# --- training data ---------------------------------------------------------------------------
@st.composite
def train_data_case(draw) -> Case:
    """The recipe (its run directory already trained) with a dataset training must refuse."""
    kind = draw(st.sampled_from(["world-bad", "cut-shard", "manifest-json", "manifest-cut", "max-id", "vocab"]))
    path, copies, files = "@D@/ds", (("@DATA@", "ds"),), ()
    if kind == "world-bad":
        path, copies = draw(st.sampled_from(["@BAD:ids over vocab (manifest)@", "@BAD:ids over vocab (scan)@",
                                             "@BAD:bigger tokenizer@", "@BAD:truncated shard@",
                                             "@BAD:corrupt manifest@", "@BAD:no manifest@", "@D@/nope"])), ()
    elif kind == "cut-shard":
        files = (("ds/shard-00000.fltok", ("cut", draw(st.integers(0, 100_000)))),)
    elif kind == "manifest-json":
        files = (("ds/manifest.json", draw(junk_file)),)
    elif kind == "manifest-cut":
        files = (("ds/manifest.json", ("cut", draw(st.integers(0, 100_000)))),)
    else:  # the manifest edited: a shard's largest id, or the tokenizer's size, beyond the model's 64
        field = "max_id" if kind == "max-id" else "vocab_size"
        files = (("ds/manifest.json", ("set", field, draw(st.integers(min_value=65, max_value=1 << 40)))),)
    return Case("train-data", ("train", "@RECIPE@", f"data.datasets={path}"), copies=copies, files=files)


def any_case() -> st.SearchStrategy[Case]:
    return st.one_of(override_case(), recipe_case(), prepare_case(), convert_case(), generate_case(),
                     train_data_case())
