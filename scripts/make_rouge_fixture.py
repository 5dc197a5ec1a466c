#!/usr/bin/env python3
"""Writes the ROUGE parity fixture under fixtures/rouge/.

The Rust port in model/src/rouge.rs must reproduce Google's `rouge-score`
package exactly as the usual evaluation scripts call it:

    rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
                             use_stemmer=True)

This script is deterministic (fixed seed, no clock, no environment reads) so
that regenerating with the same rouge-score/nltk versions gives byte-identical
files. Outputs:

    fixtures/rouge/cases.jsonl          per-pair precision/recall/F of all four types
    fixtures/rouge/stems.tsv            word<TAB>stem from the stemmer rouge-score uses
    fixtures/rouge/predictions.txt      one prediction per line
    fixtures/rouge/references.txt       one reference per line
    fixtures/rouge/corpus_expected.json mean F-measures over those lines

Usage (from the repository root):

    pip install rouge-score==0.1.2 nltk
    python3 scripts/make_rouge_fixture.py
"""

import json
import pathlib
import random
import sys

import nltk
from importlib import metadata
from rouge_score import rouge_scorer, tokenizers

SEED = 20240601
ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
OUT_DIR = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "rouge"

# Words chosen to hit Porter rules: the examples from the paper, NLTK's
# irregular forms, and every suffix of steps 1 to 5.
STEMMER_WORDS = """
running runs ran run runner easily easy generalization generalizations
generalize conditional condition conditions relational relate related
rational happiness happy happier happiest hopeful hopefully hope hoping
hoped agreed agree agreeing feed feeding fed sky skies dying die died dies
lying lie lied lies tying tie tied ties caresses caress ponies pony cats
cat plastered plaster bled motoring motor sing singing conflated conflate
troubled trouble trouble sized size hopping hop tanned tan falling fall
hissing hiss fizzed fizz failing fail filing file news innings inning
outings outing cannings canning howe proceed proceeding exceed exceeded
succeed succeeded spied spy flies fly tried try enjoy enjoyed enjoyment
valenci valency hesitanci hesitancy digitizer digitize conformabli
conformably radicalli radically differentli differently vileli vilely
analogousli analogously vietnamization predication operator feudalism
decisiveness hopefulness callousness formaliti formality sensitiviti
sensitivity sensibiliti sensibility triplicate formative formalize
electriciti electricity electrical hopeful goodness revival allowance
inference airliner gyroscopic adjustable defensible irritant replacement
adjustment dependent adoption homologou homologous communism activate
angulariti angularity effective bowdlerize probate rate cease controll
control roll rolling rolled generously generous generosity archaeology
geology theology philology biology logical logically apology apologies
fully beautifully beautiful carefulli carefully playfully mindfully
meeting meetings meet met discussed discussion discussions discuss
arranged arrangement arrangements arrange decided decision decisions
decide calling called calls call phoned phone phoning texting texted
texts text messaging messages message messaged weekend weekends tomorrow
tonight yesterday birthday birthdays party parties partying partied
cinema movies movie watching watched watch watches buying bought buys buy
shopping shopped shop shops groceries grocery delivery delivered delivers
deliver organisation organization organizational organise organize
national nationally nationality nationalism nationalist international
complicated complication complications simplify simplified simplification
simplicity simple simply relationship relationships relation relations
sensational sensation sensations sensitive sensitively sensitiveness
traditional traditionally tradition traditions emotional emotionally
emotion emotions professional professionally profession professions
responsible responsibility responsibilities irresponsible reliable
reliability reliably rely relied relies relying available availability
possibility possible possibly impossibility impossible university
universities universal universally community communities communal
electric electrical electricity electrician electronics electronic
analysis analyses analyse analysed analyzing analyzer analytical
allergic allergy allergies agency agencies agent agents argue argued
arguing argument arguments studying studied studies study student
students worried worries worry worrying hurried hurry hurrying carried
carry carries carrying married marry marriage marriages annoyed annoying
annoy annoys employed employee employees employer employment unemployment
played player players playing plays stayed staying stays stay obeyed
obeying buyer buyers enjoys destroy destroyed destroying valleys valley
journeys journey monkeys monkey keys key boys boy toys toy guys guy
says said saying paid paying pays daily dairy diary dried drying dries
cried crying cries applied applying applies apply replied replying
replies reply denied deny denying satisfied satisfy satisfying
certified certify certification qualification qualified qualify
identification identified identify identifying specification specified
specify notification notified notify justification justified justify
happening happened happens happen lessons lesson listen listened
listening opened opening opens open closing closed closes close
excited exciting excitement excite interested interesting interest
interests bored boring boredom surprised surprising surprise amazing
amazed amazement disappointed disappointing disappointment exhausted
exhausting exhaustion tired tiring relaxed relaxing relaxation stressed
stressful stress stresses pressure pressures helpful helpless helping
helped helps help useful useless usefulness uselessness careless
carelessness awareness fairness kindness darkness illness weakness
sadness madness business businesses busy busier busiest easier easiest
earlier earliest early lately later latest late sooner soonest soon
""".split()

# Stems to which suffixes are attached to make more (real or plausible) words.
BASE_STEMS = """
act adapt adopt allow annoy appear apply argu arrang assist attach attend
avoid bake believ belong bless borrow bother build burn call care carri
cel chang charg cheat check clean clear climb collect comfort commun
complain complet concern confirm connect consid contain continu control
convert correct count cover creat cross damag danc decid defend deliv
depend describ design destroy determin develop differ direct discov
discuss dislik dream dress drink drive drop earn educ effect electr
employ encourag end enjoy enter equip escap establish examin excit exist
expect experi explain explor express extend fail fix follow form found
gather generat govern grant greet guard guess handl happen harm hate
head heat help hesit hire hold hope hunt hurri identifi ignor imagin
impress improv includ increas inform injur insist inspect instal intend
interest introduc invent invest invit involv join judg jump kick kill
kiss knock label land laugh launch learn lift light like limit list
listen live load lock look lov manag mark matter measur meet melt mention
mind miss mix move nation need neglect nod note notic obey object observ
obtain occur offend offer open operat order organ own pack paint park
pass pay perform permit persuad phone pick plan plant play pleas point
possess post pour practic pray prefer prepar present preserv press
pretend prevent print produc program promis protect provid publish pull
punish push question rain reach read realiz receiv recogn recommend
record reduc refer reflect refus regard regret reject relax releas
remain rememb remind remov repair repeat replac report repres request
requir rescu respect respond rest return reveal review ring rise risk
rob rock roll rush sail satisfi save scare search seem select sell send
sens serv settl shape share shock shop sign signal simplifi sing sink
slip smile solv sort sound spell spend spill spoil start stat stay steal
step stop store strength stretch studi succeed suffer suggest suppli
support suppos surpris surround suspect swim switch talk teach tear
tempt tend test thank think threaten tick tidi tie tire toler touch tour
trade train transport trap travel treat tri trust turn type understand
unit unlock urg use valu vanish visit vote wait walk wander want warn
wash wast watch wave wear weigh welcom whisper wish wonder work worri
wrap write yawn yell zip
""".split()

SUFFIXES = """
s es ed ing er ers ly ness ful fully fulness ation ations ational
ationally ization izations ize ized izing ise ised ism ist ists ity ities
iti ment ments ement ence ences ance ances able ably ability abli ible
ibility al ally alli alism aliti alize ic ical ically iciti icate ous
ously ousli ousness ive ively iveness ivity iviti y ies ied ier iest
eed ee ant ants ent ently entli enci anci izer ator ators bli bility
logi logy logist e ate ated ating ates ion ions tion tional tionally
ll lled lling
""".split()

NAMES = [
    "Amanda", "Hannah", "Ollie", "Jerry", "Tom", "Kate", "Lucas", "Mia",
    "Olivia", "Ethan", "Sophie", "Jack", "Laura", "Nick", "Emma", "Paul",
    "Zoë", "José", "Björn", "Renée",
]

VERBS_PAST = [
    "called", "texted", "agreed", "decided", "arranged", "discussed",
    "cancelled", "postponed", "organized", "organised", "suggested",
    "promised", "forgot", "remembered", "bought", "delivered", "worried",
    "apologized", "apologised", "invited", "hurried", "replied", "tried",
    "studied", "carried", "enjoyed", "played", "stayed", "moved",
    "planned", "hopped", "tanned", "fizzed", "conflated", "sized",
    "troubled", "plastered", "bled", "generalized", "relied", "satisfied",
]

VERBS_ING = [
    "running", "meeting", "calling", "texting", "shopping", "hoping",
    "hopping", "falling", "hissing", "failing", "filing", "motoring",
    "singing", "dying", "lying", "tying", "planning", "studying",
    "worrying", "organizing", "relaxing", "travelling", "traveling",
    "cooking", "baking", "writing", "reading", "arguing", "watching",
]

OBJECTS = [
    "the birthday party", "a new phone", "the cinema tickets",
    "the conditional offer", "relational databases", "the happiness survey",
    "hopeful news", "the skies over Paris", "two ponies", "the cats",
    "the feed", "caresses", "the meeting notes", "her generalization",
    "the electricity bill", "the university application",
    "the weekend trip", "groceries for dinner", "the innings",
    "the outings", "the proceedings", "an allowance", "the replacement",
    "the adjustment", "the communities", "responsibilities",
    "the national holiday", "a sensational movie", "traditional food",
    "the emotional speech", "a professional photographer",
    "the 3rd floor", "flight BA2490", "room 101", "the 2019 report",
    "$25 dollars", "the 10:30 train", "e-mail addresses", "state-of-the-art tools",
]

TIMES = [
    "tomorrow", "tonight", "on Friday", "next weekend", "at 5 pm",
    "after work", "in the morning", "on 12.03.2021", "later today",
    "before Christmas", "on Monday", "in two weeks",
]

FILLERS = [
    "Okay", "Sure", "Thanks", "No problem", "Great", "See you",
    "Sounds good", "Haha", "Really?", "I don't know", "Sorry",
]


def build_stem_words(rng):
    """Returns ~2000 distinct words, sorted, covering every stemmer rule."""
    words = set(w.lower() for w in STEMMER_WORDS)
    words.update(BASE_STEMS)
    for base in BASE_STEMS:
        for suffix in rng.sample(SUFFIXES, 4):
            words.add(base + suffix)
    # Pseudo-words: random syllables plus a suffix, so that measure/cvc
    # conditions are exercised on shapes no dictionary would give.
    consonants = "bcdfghjklmnpqrstvwxyz"
    vowels = "aeiouy"
    while len(words) < 1900:
        syllables = rng.randint(1, 3)
        word = ""
        for _ in range(syllables):
            if rng.random() < 0.8:
                word += rng.choice(consonants)
            word += rng.choice(vowels)
            if rng.random() < 0.5:
                word += rng.choice(consonants)
        word += rng.choice(SUFFIXES + [""] * 10)
        words.add(word)
    # Short words, y-runs, doubled consonants, digits, and mixed case.
    words.update([
        "a", "i", "y", "s", "is", "as", "us", "be", "by", "ye", "yy", "ay",
        "ies", "ied", "sss", "eed", "ing", "ed", "ion", "ions", "bed",
        "yyy", "yyyy", "yyyyy", "ayy", "ayyy", "yay", "yayy", "toy", "syzygy",
        "syzygies", "yelling", "yearly", "eying", "eyed", "dyed", "dyeing",
        "ll", "all", "fall", "ill", "will", "skill", "controll", "enroll",
        "ss", "sss", "ssss", "sses", "ies", "ties", "dies", "lies", "pies",
        "flies", "cries", "skies", "sky", "news", "howe", "feed", "seed",
        "need", "deed", "bleed", "speed", "exceed", "proceed", "succeed",
        "exceeding", "proceeding", "succeeding", "innings", "inning",
        "outing", "outings", "canning", "cannings", "dying", "lying", "tying",
        "2019", "1st", "3rd", "mp3", "b2b", "covid19", "4ever", "abc123",
        "123abc", "ing1", "1ing", "x2ed", "ab", "abs", "eies", "aies",
        "Running", "RUNNING", "Happiness", "CATS", "Sky", "NEWS", "Dying",
    ])
    return sorted(words)


def dialogue_summary_pair(rng):
    """A realistic (prediction, reference) pair in the SAMSum style."""
    a, b = rng.sample(NAMES, 2)
    sentences = []
    for _ in range(rng.randint(1, 3)):
        shape = rng.randint(0, 3)
        if shape == 0:
            s = f"{a} and {b} {rng.choice(VERBS_PAST)} {rng.choice(OBJECTS)} {rng.choice(TIMES)}."
        elif shape == 1:
            s = f"{a} is {rng.choice(VERBS_ING)} {rng.choice(OBJECTS)} {rng.choice(TIMES)}."
        elif shape == 2:
            s = f"{b} {rng.choice(VERBS_PAST)} {a} about {rng.choice(OBJECTS)}."
        else:
            s = f"{a} will be {rng.choice(VERBS_ING)} with {b} {rng.choice(TIMES)}, {rng.choice(FILLERS).lower()}."
        sentences.append(s)
    reference = sentences
    prediction = [perturb_sentence(rng, s) for s in sentences]
    if rng.random() < 0.3:
        prediction = prediction[: max(1, len(prediction) - 1)]
    if rng.random() < 0.2:
        prediction.append(f"{rng.choice(FILLERS)}, {b} {rng.choice(VERBS_PAST)} {rng.choice(OBJECTS)}.")
    if rng.random() < 0.3:
        rng.shuffle(prediction)
    sep_ref = "\n" if rng.random() < 0.6 else " "
    sep_pred = "\n" if rng.random() < 0.6 else " "
    return sep_pred.join(prediction), sep_ref.join(reference)


def perturb_sentence(rng, sentence):
    words = sentence.split()
    out = []
    for w in words:
        r = rng.random()
        if r < 0.08:
            continue
        if r < 0.16:
            out.append(rng.choice(VERBS_PAST + VERBS_ING))
            continue
        if r < 0.22:
            out.append(w.upper())
            continue
        out.append(w)
        if r > 0.95:
            out.append(w)
    if len(out) > 3 and rng.random() < 0.3:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)


def long_pair(rng, vocabulary):
    """~200-token texts with several sentences separated by newlines."""
    reference_words = [rng.choice(vocabulary) for _ in range(rng.randint(180, 230))]
    prediction_words = []
    for w in reference_words:
        r = rng.random()
        if r < 0.1:
            continue
        if r < 0.25:
            prediction_words.append(rng.choice(vocabulary))
        else:
            prediction_words.append(w)
        if r > 0.93:
            prediction_words.append(rng.choice(vocabulary))

    def sentences(words):
        out, cur = [], []
        for w in words:
            cur.append(w)
            if rng.random() < 0.08:
                out.append(" ".join(cur) + ".")
                cur = []
        if cur:
            out.append(" ".join(cur) + ".")
        return "\n".join(out)

    return sentences(prediction_words), sentences(reference_words)


def repeated_pair(rng):
    tokens = ["the", "cat", "sat", "on", "mat", "running", "runs", "ran"]
    ref = [rng.choice(tokens[:3]) for _ in range(rng.randint(3, 12))]
    pred = [rng.choice(tokens) for _ in range(rng.randint(1, 15))]
    return " ".join(pred), " ".join(ref)


HANDWRITTEN = [
    ("The quick brown fox jumps over the lazy dog", "The quick brown fox jumps over the lazy dog"),
    ("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog"),
    ("alpha beta gamma", "delta epsilon zeta"),
    ("", "Amanda baked cookies and will bring Jerry some tomorrow."),
    ("Amanda baked cookies and will bring Jerry some tomorrow.", ""),
    ("", ""),
    ("   ", "\n\n"),
    ("...!!!", "???"),
    ("Hello, world!", "hello world"),
    ("HELLO WORLD", "hello world"),
    ("It costs $25.99 (incl. VAT) on 12/03/2021.", "It costs 25 99 incl VAT on 12 03 2021"),
    ("room 101, floor 3rd; mp3 files", "Room 101 on the 3rd floor has MP3 files"),
    ("state-of-the-art", "state of the art"),
    ("don't won't can't", "do not will not can not"),
    ("Café über naïve résumé", "cafe uber naive resume"),
    ("Zoë and José met Björn at the café.", "Zoe and Jose met Bjorn at the cafe."),
    ("我喜欢猫 and cats", "cats 我也喜欢狗"),
    ("東京は大きい", "東京は大きい"),
    ("Привет мир hello", "hello Привет"),
    ("\u212aelvin scale", "kelvin scale"),
    ("İstanbul is big", "istanbul is big"),
    ("ﬁne ﬂour", "fine flour"),
    ("straße", "strasse"),
    ("１２３ numbers ２０２０", "123 numbers 2020"),
    ("emoji 🙂 test 🚀", "emoji test"),
    ("tab\tseparated\twords", "tab separated words"),
    ("first line\nsecond line\nthird line", "first line second line third line"),
    ("first line second line third line", "first line\nsecond line\nthird line"),
    ("a b c\nd e f", "d e f\na b c"),
    ("\n\nleading newlines\n", "leading newlines"),
    ("windows\r\nline endings\r\n", "windows\nline endings"),
    ("one\n\n\ntwo", "one two"),
    ("!!!\n???\n...", "only punctuation\n!!!"),
    ("the the the the the", "the cat sat on the mat"),
    ("the cat sat on the mat", "the the the the the"),
    ("cat cat cat dog dog", "cat dog cat dog cat dog"),
    ("a a a a", "a"),
    ("a", "a a a a"),
    ("a", "a"),
    ("a", "b"),
    ("I", "i"),
    ("abc abc", "abc"),
    ("running runs ran", "run run run"),
    ("generalization generalizations generalize", "general generally generality"),
    ("The skies were dying and lying", "The sky dies and lies"),
    ("caresses ponies ties caress cats", "caress poni tie caress cat"),
    ("feed agreed plastered bled motoring sing", "feed agree plaster bled motor sing"),
    ("conflated troubled sized hopping tanned falling", "conflate trouble size hop tan fall"),
    ("hissing fizzed failing filing happy sky", "hiss fizz fail file happi sky"),
    ("relational conditional rational valenci hesitanci digitizer", "relate condition rational valence hesitance digitize"),
    ("news innings outings cannings howe proceed exceed succeed", "news inning outing canning howe proceed exceed succeed"),
    ("x y z", "x y z"),
    ("abcd", "abcd"),
    ("ab1 1ab 2019s", "ab1 1ab 2019"),
    ("Hannah needs Betty's number but Amanda doesn't have it.\nHannah should text Larry.",
     "Hannah is looking for Betty's number.\nAmanda can't find it.\nLarry called Betty last time."),
    ("Eric and Rob are watching a stand-up show on YouTube.",
     "Eric and Rob are going to watch a stand-up on youtube."),
    ("Lenny can't decide which trousers to buy. Bob advised Lenny on that topic. Lenny goes with Bob's advice to pick the trousers that are of best quality.",
     "Lenny will buy the purple trousers.\nBob advised him to buy the best quality ones."),
]


def score_case(scorer, prediction, reference):
    # rouge-score takes (target, prediction): the reference comes first.
    scores = scorer.score(reference, prediction)
    case = {"prediction": prediction, "reference": reference}
    for t in ROUGE_TYPES:
        s = scores[t]
        case[t] = {"p": s.precision, "r": s.recall, "f": s.fmeasure}
    return case


def main():
    rng = random.Random(SEED)
    scorer = rouge_scorer.RougeScorer(ROUGE_TYPES, use_stemmer=True)
    OUT_DIR.mkdir(parents=True, exist_ok=True)

    # The exact stemmer object rouge-score's tokenizer calls.
    stemmer = tokenizers.DefaultTokenizer(use_stemmer=True)._stemmer
    stem_words = build_stem_words(rng)
    with open(OUT_DIR / "stems.tsv", "w", encoding="utf-8", newline="\n") as f:
        for w in stem_words:
            f.write(f"{w}\t{stemmer.stem(w)}\n")

    vocabulary = [w for w in STEMMER_WORDS if len(w) > 1]
    pairs = list(HANDWRITTEN)
    for _ in range(190):
        pairs.append(dialogue_summary_pair(rng))
    for _ in range(20):
        pairs.append(long_pair(rng, vocabulary))
    for _ in range(15):
        pairs.append(repeated_pair(rng))
    # Word-soup pairs over the stemmer vocabulary: many stem collisions.
    for _ in range(20):
        ref = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(5, 30)))
        pred = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(5, 30)))
        pairs.append((pred, ref))

    with open(OUT_DIR / "cases.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for prediction, reference in pairs:
            case = score_case(scorer, prediction, reference)
            f.write(json.dumps(case, ensure_ascii=False) + "\n")

    # Corpus files for the `meshtune rouge` CLI: one example per line, so no
    # newlines inside an example.
    corpus = [dialogue_summary_pair(rng) for _ in range(18)]
    corpus = [(p.replace("\n", " "), r.replace("\n", " ")) for p, r in corpus]
    corpus.append(("!!!", "Jerry will call Amanda tomorrow."))
    corpus.append(("Running late, sorry!", "Running late, sorry!"))
    predictions = [p for p, _ in corpus]
    references = [r for _, r in corpus]
    with open(OUT_DIR / "predictions.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(p + "\n" for p in predictions))
    with open(OUT_DIR / "references.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(r + "\n" for r in references))
    totals = {t: 0.0 for t in ROUGE_TYPES}
    for prediction, reference in corpus:
        scores = scorer.score(reference, prediction)
        for t in ROUGE_TYPES:
            totals[t] += scores[t].fmeasure
    expected = {t: totals[t] / len(corpus) for t in ROUGE_TYPES}
    with open(OUT_DIR / "corpus_expected.json", "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(expected, indent=2) + "\n")

    print(
        f"wrote {len(pairs)} cases, {len(stem_words)} stems, {len(corpus)} corpus lines "
        f"(rouge-score {metadata.version('rouge-score')}, nltk {nltk.__version__}, "
        f"python {sys.version.split()[0]})"
    )


if __name__ == "__main__":
    main()
