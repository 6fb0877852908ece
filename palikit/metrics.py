"""The evaluation metrics of the PaliGemma model card, computed as big_vision computes them.

Per-example functions, then a registry (`METRICS`, `metric(name)`) that `palikit eval` runs: each
Metric turns one example into a small JSON record and the records of all examples into the
reported numbers, so scoring can be resumed and merged across ranks.

- answers: `vqav2_accuracy` (VQAv2, TextVQA; the official VQA answer normalisation of
  github.com/GT-Vision-Lab/VQA `vqaEval.py`, as big_vision/evaluators/proj/paligemma/transfers/vqav2.py
  applies it), `vqa_accuracy` (OK-VQA, A-OKVQA, OCR-VQA as .../transfers/vqa.py), `anls` (DocVQA,
  ST-VQA, InfoVQA: Biten et al. 2019, "Scene Text Visual Question Answering", Eq. 1, as the
  `anls_metric` of .../transfers/vqa.py), `relaxed_accuracy` (ChartQA as .../transfers/chartqa.py),
  `exact_match`, `count_accuracy` (TallyQA and CountBenchQA as .../transfers/tallyqa.py);
- captions: `cider`, CIDEr-D by pycocoevalcap's scorer on PTB-tokenised text as
  .../transfers/coco_caption.py; `tokenize_captions` is pycocoevalcap's PTBTokenizer (Stanford
  CoreNLP 3.4.1, needs Java) or, without Java, a Python re-implementation of its rules;
- boxes and masks: `box_iou`, `mask_iou`, RefCOCO referring segmentation as
  .../transfers/segmentation.py, referring detection (acc@0.5) and COCO mAP through pycocotools.

pycocoevalcap and pycocotools are imported only by the functions that need them
(`pip install 'palikit[eval]'`).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .tasks import NUM_LOC, NUM_SEG, NUM_SEG_PER_MASK

_EVAL_EXTRA = "pip install 'palikit[eval]'"


def _check_answers(answers: Sequence[str]) -> None:
    if not answers:
        raise ValueError("no ground-truth answers to compare with")


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


# ----------------------------------------------------------------------------- VQAv2 / TextVQA

_VQA_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # not "'": contractions keep it
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
# The official script maps each of these contractions, typed with any one of its apostrophes left
# out, to the contraction ("dont" -> "don't", "couldnt've" and "couldn'tve" -> "couldn't've").
_VQA_CONTRACTIONS = """
    ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
    haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't
    mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't
    she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd
    someone'd've someone'll someone's something'd something'd've something'll that's there'd
    there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've
    we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've
    who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll
    y'all'd've you'd you'd've you'll you're you've
""".split()
_VQA_WORD_MAP = {
    contraction[:i] + contraction[i + 1:]: contraction
    for contraction in _VQA_CONTRACTIONS
    for i, char in enumerate(contraction)
    if char == "'"
} | _VQA_NUMBER_WORDS | {
    "somebody'd": "somebodyd",  # sic: the official table has this entry the wrong way round
}  # fmt: skip
# Its capitalised entries ("Im", "Ive", "Id've", "I'dve") never match: words are lower-cased first.


def normalize_vqa_answer(text: str) -> str:
    """The official VQA answer normalisation: punctuation, full stops, case, articles, number
    words and contractions."""
    # Punctuation touching a space is deleted, inside a word it becomes a space ("red/blue" is two
    # words). A digit comma anywhere ("1,000") deletes all of it: a quirk of the official script
    # that big_vision keeps on purpose.
    delete_all = re.search(r"\d,\d", text) is not None
    out = text
    for p in _VQA_PUNCTUATION:
        out = out.replace(p, "" if delete_all or f"{p} " in text or f" {p}" in text else " ")
    # The script means "a full stop not inside a number", but its look-behind is mistyped as a
    # look-ahead, so only a following digit protects a full stop ("3.5" stays, "a.m." loses both).
    out = re.sub(r"\.(?!\d)", "", out)
    words = [w for w in out.lower().split() if w not in _VQA_ARTICLES]
    return " ".join(_VQA_WORD_MAP.get(w, w) for w in words)


def _vqa_strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqav2_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA score of one answer against the (ten) human answers.

    Answers are stripped, and normalised only when the humans disagree (the official script's way
    of leaving OCR-like answers alone). Each human answer is left out in turn; against the others
    the prediction scores min(1, matches / 3); the score is the mean over the leave-outs. big_vision
    always leaves out ten (VQAv2 and TextVQA have ten answers); this uses every answer, as the
    official script does, which is the same for ten."""
    _check_answers(answers)
    prediction, answers = _vqa_strip(prediction), [_vqa_strip(a) for a in answers]
    if len(set(answers)) > 1:
        prediction, answers = normalize_vqa_answer(prediction), [normalize_vqa_answer(a) for a in answers]
    matches = sum(a == prediction for a in answers)
    # Leaving out a matching answer leaves matches - 1 matches, any other leaves all of them.
    left_out = [matches - (a == prediction) for a in answers]
    return float(np.mean([min(1.0, m / 3) for m in left_out]))


# ----------------------------------------------------------------------------- OK-VQA, OCR-VQA, DocVQA

def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(1, matches / 3) over the answers, as big_vision's vqa.py for OK-VQA and A-OKVQA: no
    normalisation, no leave-one-out (the official A-OKVQA script has none either). A single answer
    (OCR-VQA) is an exact match, as vqa.py scores its single-answer datasets."""
    _check_answers(answers)
    matches = sum(prediction == a for a in answers)
    return float(matches > 0) if len(answers) == 1 else min(1.0, matches / 3)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the stripped prediction equals any stripped answer."""
    _check_answers(answers)
    return float(prediction.strip() in {a.strip() for a in answers})


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))  # distances from a[:0] to each prefix of b
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], theta: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one answer: the best over the answers of
    1 - distance / max(length) when that distance is below theta, else 0.

    Strings are compared lower-cased (big_vision's DocVQA, ST-VQA and InfoVQA configs set
    `to_lower`) and stripped (as the ST-VQA and DocVQA evaluation servers do; big_vision leaves
    the decoded text as it is, which never has surrounding blanks). An empty answer matches only an
    empty prediction."""
    _check_answers(answers)
    prediction = prediction.strip().lower()

    def similarity(answer: str) -> float:
        if not answer:
            return float(prediction == "")
        distance = _levenshtein(answer, prediction) / max(len(answer), len(prediction))
        return 1.0 - distance if distance < theta else 0.0

    return max(similarity(a.strip().lower()) for a in answers)


# ----------------------------------------------------------------------------- ChartQA

def _chartqa_float(text: str) -> float | None:
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answer: str, max_relative_error: float = 0.05) -> float:
    """ChartQA's relaxed accuracy (Masry et al. 2022, after Methani et al. 2020): a number within
    max_relative_error of a non-zero numeric answer is right, anything else needs an exact match.

    As big_vision's chartqa.py with the ChartQA config's `to_lower`. "45%" reads as 0.45, so it
    matches "0.45" but not "45"; an answer of 0 needs the exact string."""
    prediction, answer = prediction.lower(), answer.lower()
    predicted, target = _chartqa_float(prediction), _chartqa_float(answer)
    if predicted is not None and target:
        return float(abs(predicted - target) / abs(target) <= max_relative_error)
    return float(prediction == answer)


# ----------------------------------------------------------------------------- TallyQA / CountBenchQA

_COUNT_WORDS = _VQA_NUMBER_WORDS | {
    "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14", "fifteen": "15",
    "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19", "twenty": "20",
}  # fmt: skip
_LARGEST_TRACKED_COUNT = 15  # tallyqa.py reports accuracy per true count 0..15


def count_answer(text: str) -> str:
    """A whole answer that is a number word (any case) as its numeral: "Two" -> "2"."""
    return _COUNT_WORDS.get(text.lower(), text)


def count_accuracy(prediction: str, answer: str) -> float:
    """TallyQA / CountBenchQA: exact match once number words are numerals (big_vision's tallyqa.py,
    which big_vision's configs also use for CountBenchQA)."""
    return float(count_answer(prediction) == count_answer(answer))


# ----------------------------------------------------------------------------- captions: PTB tokens, CIDEr

# What pycocoevalcap deletes after tokenising. Its list also has -LRB-, -RRB-, -LCB-, -RCB-, which
# never match: the tokenizer runs with -lowerCase, so "(" survives as "-lrb-".
_PTB_REMOVED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
# Java's line terminators; pycocoevalcap replaces only "\n", so any other one would shift every
# later caption onto the wrong image.
_LINE_BREAKS = re.compile("[\r\x0b\x0c\x85\u2028\u2029]")

_LETTER = r"[^\W\d_]"
_ALNUM = r"[^\W_]"
# Abbreviations that keep their full stop (found by running the 3.4.1 tokenizer; it reads them in
# any case): months, weekdays, US states, company words, titles and a few more.
_PTB_ABBREVIATIONS = """
    jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri
    ala ariz calif colo conn ct dak fla ga ind kan kans ky md mich minn mo mont neb nev okla penn
    tenn va vt wis wisc wyo inc co cos corp pty ptys pte ltd plc bancorp dept bhd assn univ intl
    sys invt elec natl mfg mtg tel est ext sq etc al seq jr sr bros blvd rd esq mr mrs ms dr drs
    prof profs sen sens rep reps atty attys lt col gen messrs gov govs adm rev maj sgt cpl pvt mt
    capt st ste ave pres lieut hon brig cmdr comdr pfc spc supt supts det mme mlle vs alex wm jos
    cie cf treas bldg ft
""".split()
_PTB_ABBREVIATIONS_BEFORE_NUMBER = ["ca", "figs?", "prop", "nos?", "art", "pp", "op"]  # "no. 5"
# Longest match wins, the earlier pattern on a tie, as in the JFlex lexer.
_PTB_TOKEN_PATTERNS = [
    re.compile(pattern)
    for pattern in (
        r"(?:https?://|www\.)[^\s\"<>()\[\]{}]*[^\s\"<>()\[\]{}.,;:!?']",  # a URL
        rf"</?{_LETTER}[^<>\n]*>",  # an SGML tag
        # A word: letters and digits joined by - / @ _, ' after a letter, or . ! ? before a letter.
        (
            rf"(?:#{_LETTER}|@{_ALNUM}|{_ALNUM}){_ALNUM}*"
            rf"(?:[-/@_]{_ALNUM}+|(?<={_LETTER})'{_ALNUM}+|[.!?]{_LETTER}{_ALNUM}*)*"
        ),
        r"[-+]?\d*(?:[.,:]\d+)+|[-+]?\d+",  # a number: "1,000", "3.5", "10:30", ".5", "-5"
        rf"\d*(?:[.,]\d+)+{_ALNUM}*(?:-{_ALNUM}+)+",  # a hyphenated word led by one: "1,000-piece"
        rf"{_LETTER}(?:\.{_LETTER})+\.?(?:-{_ALNUM}+)*",  # an acronym: "u.s.", "e.g.", "u.s.-made"
        rf"(?i:{'|'.join(_PTB_ABBREVIATIONS)}|{_LETTER})\.",  # "mr.", "etc.", a single letter "b."
        rf"(?i:{'|'.join(_PTB_ABBREVIATIONS_BEFORE_NUMBER)})\.(?=\s*\d)",
        r"[A-Z]+&[A-Z]+",  # "R&B", but "at&t" splits
        rf"[:;=](?:-?[()]|o[()]|[DPdp|@\]])(?!{_ALNUM})",  # a smiley: ":)" -> ":-rrb-"
        # Apostrophe words: "'90s", "'em", "'til", "'n'", "'t" of "'twas", a detached "'s".
        rf"'(?:\d+s?|(?i:em|til|cause|n'?|s|m|d|ll|re|ve))(?!{_ALNUM})|'t(?=(?:was|is)(?!{_ALNUM}))",
        r"\.+|-{2,}|[?!]+|``|''",
        r"\S",
    )
]
_PTB_SPLIT_WORDS = {"gonna", "gotta", "wanna", "lemme", "gimme", "cannot"}  # each splits after 3 letters
_PTB_CONTRACTION = re.compile(r"(?i)(.+?)(n't|'s|'m|'d|'ll|'re|'ve|'n)")
_PTB_SYMBOLS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}
# ptb3Escaping's normalisations: curly quotes, dashes, ellipsis, currency, fractions.
_PTB_CHARACTERS = str.maketrans({
    "\u2019": "'", "\u2018": "`", "\u201c": '"', "\u201d": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2013": "--", "\u2014": "--", "\u2015": "--", "\u2026": "...", "\u00a3": "#", "\u20ac": "$",
    "\u00a2": " cents", "\u00bd": "1/2", "\u00bc": "1/4", "\u00be": "3/4",
})  # fmt: skip
# Characters the lexer cannot tokenize are deleted (its untokenizable=firstDelete): anything outside
# the Basic Multilingual Plane (emoji) and the two dashes it does not know.
_PTB_UNTOKENIZABLE = re.compile("[\U00010000-\U0010ffff\u2010\u2012]")
_HTML_ENTITIES = {"amp": "&", "lt": "<", "gt": ">", "quot": '"'}


def _ptb_split_word(word: str) -> list[str]:
    """A word with its contractions split off as PTB does: "don't" -> do n't, "rock'n'roll" ->
    rock 'n' roll, "gonna" -> gon na."""
    if word.lower() in _PTB_SPLIT_WORDS:
        return [word[:3], word[3:]]
    if (infix := re.fullmatch(r"(?i)(.+?)('n')(.+)", word)) is not None:
        return [infix[1], infix[2], *_ptb_split_word(infix[3])]
    if (suffix := _PTB_CONTRACTION.fullmatch(word)) is not None:
        return [*_ptb_split_word(suffix[1]), suffix[2]]
    return [word]


def _ptb_tokenize(text: str) -> str:
    """One caption as `PTBTokenizer -preserveLines -lowerCase` then pycocoevalcap's punctuation
    removal would give it, by the lexer's rules for the text that captions hold."""
    text = re.sub(r"&(amp|lt|gt|quot);", lambda m: _HTML_ENTITIES[m[1]], text)
    text = _PTB_UNTOKENIZABLE.sub("", text.translate(_PTB_CHARACTERS))
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        token = max((m[0] for p in _PTB_TOKEN_PATTERNS if (m := p.match(text, pos))), key=len)
        pos += len(token)
        if token[0].isalnum():
            tokens += _ptb_split_word(token)
        elif re.fullmatch(r"\.+", token):
            tokens.append("...")
        elif re.fullmatch(r"-{2,}", token):
            tokens.append("--")
        else:  # a symbol, or one with brackets inside (a smiley)
            tokens.append(_PTB_SYMBOLS.get(token) or re.sub(r"[()]", lambda b: _PTB_SYMBOLS[b[0]], token))
    return " ".join(t.lower() for t in tokens if t not in _PTB_REMOVED)


def tokenize_captions(texts: Sequence[str], java: bool | None = None) -> list[str]:
    """Captions as the COCO caption metrics see them: lower-cased PTB tokens joined by spaces,
    punctuation removed ("A man's hat." -> "a man 's hat").

    java: run pycocoevalcap's PTBTokenizer (Stanford CoreNLP, as big_vision does), or the Python
    rules that follow it; None: Java when `java` is on the PATH."""
    texts = [_LINE_BREAKS.sub(" ", t) for t in texts]
    if java is None:
        java = shutil.which("java") is not None
    if not java or not texts:
        return [_ptb_tokenize(t) for t in texts]
    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise ImportError(f"the Java PTB tokenizer needs pycocoevalcap: {_EVAL_EXTRA}") from None
    with _java_quiet():
        tokens = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    return [tokens[i][0] for i in range(len(texts))]


@contextlib.contextmanager
def _java_quiet():
    """Send what the Java tokenizer prints on stderr ("PTBTokenizer tokenized 47 tokens at ...")
    to /dev/null: it inherits the process's file descriptor 2, past Python's sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cider(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D of one caption per image against its references, on the scale of
    pycocoevalcap's `Cider().compute_score` (the model card prints 100x this). All captions are
    tokenised by `tokenize_captions` first, as big_vision's coco_caption.py does."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference caption")
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise ImportError(f"cider needs pycocoevalcap: {_EVAL_EXTRA}") from None
    # One tokenizer run for everything: Java starts once.
    tokens = tokenize_captions([*predictions, *(r for refs in references for r in refs)])
    res, gts, start = {}, {}, len(predictions)
    for i, refs in enumerate(references):
        res[i], gts[i] = [tokens[i]], tokens[start:start + len(refs)]
        start += len(refs)
    score, _ = Cider().compute_score(gts, res)
    return float(score)


# ----------------------------------------------------------------------------- boxes and masks

def box_iou(a, b) -> float:
    """Intersection over union of two xyxy boxes; 0.0 when both are empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# The start of a segmentation output that segmentation.py accepts: 4 loc then 16 seg tokens.
_SEGMENTATION_START = re.compile(rf"((?:<loc\d{{4}}>){{4}})((?:<seg\d{{3}}>){{{NUM_SEG_PER_MASK}}})")


def _segmentation_box(prediction: str) -> tuple[int, int, int, int] | None:
    """The (y1, x1, y2, x2) loc values of a valid segmentation output, else None.

    As segmentation.py: the output must start with 4 loc and 16 seg tokens (the rest is ignored),
    all in range, with y2 > y1 and x2 > x1."""
    start = _SEGMENTATION_START.match(prediction)
    if start is None:
        return None
    locs = [int(v) for v in re.findall(r"\d+", start[1])]
    segs = [int(v) for v in re.findall(r"\d+", start[2])]
    if max(locs) >= NUM_LOC or max(segs) >= NUM_SEG or not (locs[2] > locs[0] and locs[3] > locs[1]):
        return None
    return locs[0], locs[1], locs[2], locs[3]


def referring_segmentation(example: dict) -> dict:
    """One RefCOCO example as big_vision's segmentation.py scores it: mask IoU and box IoU of the
    predicted object against the true one.

    The box IoU is taken in 0..1 image coordinates from the loc tokens. The mask IoU compares
    `objects[0].mask` (palikit's paste_mask: the decoded 64x64 mask resized bilinearly into the box
    truncated to pixels, thresholded at 0, as segmentation.py does) with the true mask. An invalid
    output, or a box empty once truncated to pixels, scores IoU 0 and counts as invalid.

    An example without a true object (a negative: nothing to find) scores IoU 1 when nothing is
    predicted, as two empty masks match (mask_iou), and 0 for a predicted object, a false positive."""
    if not example.get("truth_objects"):
        return _negative(example)
    truth = example["truth_objects"][0]
    true_mask = np.asarray(truth["mask"], bool)
    h, w = true_mask.shape
    tx1, ty1, tx2, ty2 = truth["box"]
    true_box = (tx1 / w, ty1 / h, tx2 / w, ty2 / h)
    locs = _segmentation_box(example["prediction"])
    objects = example.get("objects") or []
    if locs is None or not objects:
        return {"iou": 0.0, "box_iou": 0.0, "invalid": True}
    y1, x1, y2, x2 = (v / (NUM_LOC - 1) for v in locs)
    box_overlap = box_iou((x1, y1, x2, y2), true_box)
    # segmentation.py truncates the box to pixels and calls it invalid when that empties it.
    if int(x2 * w) <= int(x1 * w) or int(y2 * h) <= int(y1 * h):
        return {"iou": 0.0, "box_iou": box_overlap, "invalid": True}
    return {"iou": mask_iou(objects[0].mask, true_mask), "box_iou": box_overlap, "invalid": False}


def _aggregate_referring_segmentation(records: list[dict]) -> dict[str, float]:
    # segmentation.py's miou, boxacc/0.5, boxacc/0.75, invalid, total; no cIoU.
    return {
        "miou": _mean([r["iou"] for r in records]),
        "boxacc_50": _mean([r["box_iou"] >= 0.5 for r in records]),
        "boxacc_75": _mean([r["box_iou"] >= 0.75 for r in records]),
        "invalid": sum(r["invalid"] for r in records),
        "total": len(records),
    }


def _negative(example: dict) -> dict:
    """The score of an example without a true object: right (IoU 1) when nothing is predicted."""
    right = float(not example.get("objects"))
    return {"iou": right, "box_iou": right, "invalid": False}


def referring_detection(example: dict) -> dict:
    """The first predicted box against the one true box (RefCOCO detection); a negative example
    (no true box) is right when nothing is predicted (_negative)."""
    if not example.get("truth_objects"):
        return {k: v for k, v in _negative(example).items() if k != "iou"}
    objects = example.get("objects") or []
    if not objects:
        return {"box_iou": 0.0, "invalid": True}
    return {"box_iou": box_iou(objects[0].box, example["truth_objects"][0]["box"]), "invalid": False}


def _aggregate_referring_detection(records: list[dict]) -> dict[str, float]:
    return {
        "first_box_acc_50": _mean([r["box_iou"] >= 0.5 for r in records]),
        "invalid": sum(r["invalid"] for r in records),
        "total": len(records),
    }


def _detections_record(example: dict) -> dict:
    objects = example.get("objects") or []
    truth = example.get("truth_objects") or []
    return {
        "boxes": [[float(v) for v in o.box] for o in objects],
        "labels": [o.label for o in objects],
        # exp(mean token log-prob); objects parsed without log-probs all tie at 1.0.
        "scores": [1.0 if o.logprob is None else math.exp(o.logprob) for o in objects],
        "truth_boxes": [[float(v) for v in t["box"]] for t in truth],
        "truth_labels": [t["label"] for t in truth],
    }


def detection_map(records: list[dict]) -> dict[str, float]:
    """COCO box mAP (AP@[.5:.95]), AP50 and AP75 by pycocotools' COCOeval over detection records
    (boxes xyxy, labels, scores, truth_boxes, truth_labels, one record per image).

    Each label string is one category. A category no image has in its truth has no AP, as in COCO;
    boxes on an image without true ones (a negative) are false positives of their categories. With
    no true box at all the AP is undefined: None (pycocotools' -1), reported as "n/a".
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError(f"detection mAP needs pycocotools: {_EVAL_EXTRA}") from None
    labels = dict.fromkeys(label for r in records for label in (*r["truth_labels"], *r["labels"]))
    categories = [{"id": i, "name": label} for i, label in enumerate(labels, 1)]
    category_id = {c["name"]: c["id"] for c in categories}

    def annotation(image_id: int, box: Sequence[float], label: str) -> dict:
        x1, y1, x2, y2 = box
        return {"image_id": image_id, "category_id": category_id[label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}

    def coco(annotations: list[dict]) -> COCO:
        dataset = COCO()
        dataset.dataset = {
            "images": [{"id": i} for i in range(1, len(records) + 1)],
            "annotations": [a | {"id": i} for i, a in enumerate(annotations, 1)],  # COCOeval needs ids > 0
            "categories": categories,
        }
        dataset.createIndex()
        return dataset

    truth = [annotation(i, box, label) for i, r in enumerate(records, 1)
             for box, label in zip(r["truth_boxes"], r["truth_labels"])]
    found = [annotation(i, box, label) | {"score": score} for i, r in enumerate(records, 1)
             for box, label, score in zip(r["boxes"], r["labels"], r["scores"])]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        evaluation = COCOeval(coco(truth), coco(found), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    ap, ap50, ap75 = (float(v) if v >= 0 else None for v in evaluation.stats[:3])
    return {"map": ap, "ap50": ap50, "ap75": ap75, "num": len(records)}


# ----------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Metric:
    name: str  # the registry key, e.g. "vqav2_accuracy"
    summary: str  # one line, shown in `palikit eval --metric` help and errors
    score: Callable[[dict], dict]  # one example -> a small JSON-serialisable record
    aggregate: Callable[[list[dict]], dict[str, float]]  # records of all examples -> the reported numbers
    values: tuple[str, ...] = ()  # every name `aggregate` may report (a run's settings are checked against them)


def _answers(example: dict) -> list[str]:
    return list(example.get("answers") or [])


def _means(records: list[dict], keys: Sequence[str]) -> dict[str, float]:
    """Means of the keys over the records that were scored (big_vision skips examples without
    ground truth in the means, but counts them in `num`)."""
    scored = [r for r in records if r[keys[0]] is not None]
    means = {k: _mean([r[k] for r in scored]) for k in keys} if scored else {}
    return means | {"num": len(records)}


def _answer_metric(name: str, summary: str, functions: dict[str, Callable[[str, list[str]], float]],
                   lower: bool = False) -> Metric:
    """A metric of the answer text against the answers: one record key per function."""

    def score(example: dict) -> dict:
        prediction, answers = example["prediction"], _answers(example)
        if lower:
            prediction, answers = prediction.lower(), [a.lower() for a in answers]
        return {k: f(prediction, answers) if answers else None for k, f in functions.items()}

    return Metric(name, summary, score, lambda records: _means(records, list(functions)), (*functions, "num"))


def _any_match(prediction: str, answers: Sequence[str]) -> float:
    """vqa.py's acc_any: the prediction is one of the answers."""
    return float(prediction in answers)


def _score_vqav2(example: dict) -> dict:
    answers = _answers(example)
    return {
        "accuracy": vqav2_accuracy(example["prediction"], answers) if answers else None,
        "answer_type": (example.get("extra") or {}).get("answer_type"),
    }


def _aggregate_vqav2(records: list[dict]) -> dict[str, float]:
    # vqav2.py: acc, then acc and num per answer type (those that occur), then num.
    scored = [r for r in records if r["accuracy"] is not None]
    out = {"accuracy": _mean([r["accuracy"] for r in scored])} if scored else {}
    for answer_type in ("yes/no", "number", "other"):
        if typed := [r["accuracy"] for r in scored if r["answer_type"] == answer_type]:
            key = answer_type.replace("/", "")
            out |= {f"accuracy_{key}": _mean(typed), f"num_{key}": len(typed)}
    return out | {"num": len(records)}


def _score_chartqa(example: dict) -> dict:
    prediction, (answer,) = example["prediction"], example["answers"]
    return {
        "relaxed_accuracy": relaxed_accuracy(prediction, answer),
        "accuracy": float(prediction.lower() == answer.lower()),
    }


def _score_count(example: dict) -> dict:
    issimple = (example.get("extra") or {}).get("issimple")
    answer = example["answers"][0]
    return {
        "accuracy": count_accuracy(example["prediction"], answer),
        # TallyQA's test splits say 1 (simple) or 0 (complex); anything else is in neither split.
        "split": {1: "simple", 0: "complex"}.get(issimple),  # True == 1, False == 0
        "count": count_answer(answer),
    }


_COUNT_GROUPS = ("", "_simple", "_complex", *(f"_count_{c}" for c in range(_LARGEST_TRACKED_COUNT + 1)))


def _aggregate_count(records: list[dict]) -> dict[str, float]:
    # tallyqa.py: acc and num over all, then per split and per true count 0..15, where there are any.
    groups = {"": records}
    for split in ("simple", "complex"):
        groups[f"_{split}"] = [r for r in records if r["split"] == split]
    for count in range(_LARGEST_TRACKED_COUNT + 1):
        groups[f"_count_{count}"] = [r for r in records if r["count"] == str(count)]
    out = {}
    for suffix, group in groups.items():
        if group:
            out |= {f"accuracy{suffix}": _mean([r["accuracy"] for r in group]), f"num{suffix}": len(group)}
    return out


def _caption_record(example: dict) -> dict:
    return {"prediction": example["prediction"], "references": _answers(example)}


def _aggregate_cider(records: list[dict]) -> dict[str, float]:
    score = cider([r["prediction"] for r in records], [r["references"] for r in records])
    return {"cider": score, "num": len(records)}


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        _answer_metric("exact_match", "stripped answer equals any ground truth", {"exact_match": exact_match}),
        Metric("vqav2_accuracy", "VQAv2/TextVQA: normalised answers, leave-one-out min(1, matches/3)",
               _score_vqav2, _aggregate_vqav2,
               ("accuracy", "num", *(f"{v}_{t}" for t in ("yesno", "number", "other") for v in ("accuracy", "num")))),
        _answer_metric("vqa_accuracy", "OK-VQA/A-OKVQA: min(1, matches/3), a single answer exactly",
                       {"accuracy": vqa_accuracy, "accuracy_any": _any_match}),
        _answer_metric("vqa_accuracy_lowercase", "OCR-VQA: vqa_accuracy on lower-cased text",
                       {"accuracy": vqa_accuracy, "accuracy_any": _any_match}, lower=True),
        _answer_metric("anls", "DocVQA/ST-VQA/InfoVQA: ANLS, threshold 0.5, lower-cased", {"anls": anls}),
        _answer_metric("ocr", "text reading: exact match and ANLS", {"exact_match": exact_match, "anls": anls}),
        Metric("relaxed_accuracy", "ChartQA: numbers within 5%, other answers exactly, lower-cased",
               _score_chartqa, lambda records: _means(records, ["relaxed_accuracy", "accuracy"]),
               ("relaxed_accuracy", "accuracy", "num")),
        Metric("cider", "COCO captions: corpus CIDEr-D on PTB tokens (model card: x100)",
               _caption_record, _aggregate_cider, ("cider", "num")),
        Metric("segmentation_miou", "RefCOCO segmentation: mean mask IoU, box acc@0.5/0.75, invalid outputs",
               referring_segmentation, _aggregate_referring_segmentation,
               ("miou", "boxacc_50", "boxacc_75", "invalid", "total")),
        Metric("referring_detection", "RefCOCO detection: the first box's IoU >= 0.5 with the true box "
               "(first_box_acc_50)",
               referring_detection, _aggregate_referring_detection, ("first_box_acc_50", "invalid", "total")),
        Metric("detection_map", "detection: COCO box mAP@[.5:.95], AP50, AP75 (pycocotools)",
               _detections_record, detection_map, ("map", "ap50", "ap75", "num")),
        Metric("tallyqa_accuracy", "TallyQA: count exact match (number words as digits), simple/complex",
               _score_count, _aggregate_count, tuple(f"{v}{g}" for g in _COUNT_GROUPS for v in ("accuracy", "num"))),
        Metric("countbench_accuracy", "CountBenchQA: count exact match (number words as digits)",
               _score_count, _aggregate_count, tuple(f"{v}{g}" for g in _COUNT_GROUPS for v in ("accuracy", "num"))),
    )
}


def metric(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return METRICS[name]
