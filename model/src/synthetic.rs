//! The bundled default task: a seeded generator of a learnable dialogue-summarization corpus
//! in Samsum format, the T5-style Unigram tokenizer trained on it, a tiny FLAN-style T5
//! config, and the committed copies of all three (`fixtures/synthetic/`) embedded in the
//! library so that a node can train without any download.
//!
//! Owns: the corpus vocabulary and dialogue grammar, tokenizer training, the tiny config and
//! writing the bundle. Must not train models, split data (see [`crate::split`]) or touch
//! tensors.
//!
//! The task: two or three people arrange to meet. The summary states who meets, where, on
//! which day, at what time and what for ("Anna and Tom will meet at the library on Tuesday
//! at 5 pm to study."). What makes it more than copying: a proposal may be changed (the
//! summary uses the agreed day, time or place, which is always the last one mentioned), a
//! third person may decline (left out of the meeting and named in a second sentence), "my
//! place" must be resolved to the speaker ("at Tom's place"), and distractor turns mention
//! weather, food, other places and other people.

use std::path::{Path, PathBuf};

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::unigram::{Unigram, UnigramTrainer};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{NFKC, NormalizerWrapper, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString,
    PreTokenizer, Tokenizer,
};

use crate::data::{SamsumRecord, parse_samsum};
use crate::seeded_rng::SeededRng;

/// Participants and people mentioned in distractor turns.
pub const NAMES: [&str; 40] = [
    "Anna", "Tom", "Kate", "Mike", "Lucy", "Jack", "Emma", "Paul", "Sara", "Ben", "Mia", "Leo",
    "Nina", "Sam", "Zoe", "Adam", "Lily", "Max", "Eva", "Dan", "Ruby", "Joe", "Ella", "Alex",
    "Rose", "Ryan", "Amy", "Luke", "Ivy", "Jake", "Hannah", "Oscar", "Chloe", "Ethan", "Grace",
    "Noah", "Julia", "Owen", "Alice", "Harry",
];

/// Meeting places as they appear after "at" in a summary. A meeting may also be at a
/// participant's home ("my place" in the dialogue, "Tom's place" in the summary).
pub const PLACES: [&str; 30] = [
    "the library",
    "the cafe",
    "the gym",
    "the park",
    "the cinema",
    "the mall",
    "the museum",
    "the beach",
    "the pool",
    "the office",
    "the pub",
    "the bakery",
    "the stadium",
    "the bookstore",
    "the market",
    "the bus stop",
    "the pizza place",
    "the tennis court",
    "the community center",
    "the coffee shop",
    "the bowling alley",
    "the lake",
    "the main square",
    "the train station",
    "the town hall",
    "the campus",
    "the food court",
    "the skate park",
    "the art gallery",
    "the city garden",
];

pub const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// In chronological order (a "too early" change moves later in this list).
pub const TIMES: [&str; 14] = [
    "8 am", "9 am", "10 am", "11 am", "12 pm", "1 pm", "2 pm", "3 pm", "4 pm", "5 pm", "6 pm",
    "7 pm", "8 pm", "9 pm",
];

/// What the meeting is for, as it appears after "to" in a summary.
pub const ACTIVITIES: [&str; 25] = [
    "study",
    "watch a movie",
    "play tennis",
    "have lunch",
    "work on the project",
    "go running",
    "play chess",
    "have coffee",
    "go shopping",
    "prepare the presentation",
    "play football",
    "have dinner",
    "go swimming",
    "practice guitar",
    "review the notes",
    "plan the trip",
    "play cards",
    "go climbing",
    "bake a cake",
    "fix the bike",
    "discuss the budget",
    "paint the fence",
    "watch the match",
    "do yoga",
    "rehearse the play",
];

const EXCUSES: [&str; 8] = [
    "a dentist appointment",
    "work",
    "an exam",
    "football practice",
    "a family dinner",
    "a doctor's appointment",
    "a meeting",
    "my driving lesson",
];

const SMALL_TALK: [&str; 24] = [
    "It's supposed to rain all week.",
    "So hot today!",
    "Bring an umbrella, it's windy out.",
    "Finally some sun.",
    "It's freezing outside.",
    "I just had the best pasta.",
    "I'm starving.",
    "Did you try the new ramen place?",
    "I made soup yesterday, it was great.",
    "I ate way too much pizza.",
    "Did you see the game last night?",
    "My phone is almost dead.",
    "Haha",
    "lol",
    "I'm so tired today.",
    "Have you finished that book?",
    "Work is crazy this week.",
    "My cat knocked over my coffee again.",
    "I need a holiday.",
    "The traffic was terrible this morning.",
    "Did you watch the new episode?",
    "I finally fixed my laptop.",
    "My neighbours are so loud.",
    "Ugh, I forgot my keys again.",
];

/// Generator settings. `examples` records are produced; example `i` depends only on
/// `(seed, i)`, so a longer corpus extends a shorter one with the same seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticConfig {
    pub examples: usize,
    pub seed: u64,
}

impl Default for SyntheticConfig {
    /// What `fixtures/synthetic/` was made with: 4000 training examples (the 200 evaluation
    /// examples come after them, see [`write_bundle`]).
    fn default() -> Self {
        Self {
            examples: 4000,
            seed: 42,
        }
    }
}

/// Upper bound on the bundled tokenizer's size (special tokens included). The trainer stops
/// at the pieces the corpus supports (430 for the default corpus: about one per word).
pub const TOKENIZER_VOCAB_SIZE: usize = 1500;

/// What changed between the first proposal and the agreement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanChange {
    None,
    /// The first proposed day was rejected.
    Day {
        proposed: &'static str,
    },
    /// The first proposed time was rejected.
    Time {
        proposed: &'static str,
    },
    /// The first proposed place was rejected.
    Place {
        proposed: &'static str,
    },
}

/// The facts a summary is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeetingPlan {
    /// Who meets, in the order the summary names them (the initiator first).
    pub participants: Vec<&'static str>,
    /// A third speaker who declined.
    pub absent: Option<&'static str>,
    /// As in the summary: an entry of [`PLACES`] or "NAME's place".
    pub place: String,
    /// The participant whose "my place" the meeting is at.
    pub host: Option<&'static str>,
    pub day: &'static str,
    pub time: &'static str,
    pub activity: &'static str,
    pub change: PlanChange,
    /// Turns in the dialogue.
    pub turns: usize,
}

/// A generated record with the plan it was generated from (for tests and analysis).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticExample {
    pub record: SamsumRecord,
    pub plan: MeetingPlan,
}

/// `config.examples` records with ids `synth-000000`, `synth-000001`, ...
pub fn generate_corpus(config: &SyntheticConfig) -> Vec<SamsumRecord> {
    generate_examples(config)
        .into_iter()
        .map(|example| example.record)
        .collect()
}

/// [`generate_corpus`] with the plan behind every record.
pub fn generate_examples(config: &SyntheticConfig) -> Vec<SyntheticExample> {
    (0..config.examples)
        .map(|index| generate_example(config.seed, index))
        .collect()
}

/// Example `index` of the corpus with `seed`.
pub fn generate_example(seed: u64, index: usize) -> SyntheticExample {
    // A separate stream per example: consecutive SplitMix64 seeds would give overlapping
    // streams, so the pair is mixed first.
    let mut rng = SeededRng::new(seed ^ SeededRng::new(index as u64).next_u64());
    let mut rng = SeededRng::new(rng.next_u64());
    let (dialogue, plan) = DialogueBuilder::new(&mut rng).build();
    SyntheticExample {
        record: SamsumRecord {
            id: format!("synth-{index:06}"),
            dialogue,
            summary: summary_of(&plan),
        },
        plan,
    }
}

/// The reference summary of a plan.
pub fn summary_of(plan: &MeetingPlan) -> String {
    let names = match plan.participants.as_slice() {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    };
    let mut summary = format!(
        "{names} will meet at {} on {} at {} to {}.",
        plan.place, plan.day, plan.time, plan.activity
    );
    if let Some(absent) = plan.absent {
        summary.push_str(&format!(" {absent} can't come."));
    }
    summary
}

/// Who proposes (and accepts changes), who asks where, who objects.
#[derive(Debug, Clone, Copy)]
struct Roles {
    proposer: &'static str,
    other: &'static str,
    objector: &'static str,
}

/// The plan's choices drawn before the first turn is written ([`DialogueBuilder::draft`]).
struct Draft {
    speakers: Vec<&'static str>,
    /// The opener, the replier and an optional third speaker.
    a: &'static str,
    b: &'static str,
    c: Option<&'static str>,
    c_joins: bool,
    activity: &'static str,
    /// The first proposals and what was agreed (the same unless `change` says otherwise).
    first_day: &'static str,
    day: &'static str,
    first_time: &'static str,
    time: &'static str,
    first_place: &'static str,
    place: &'static str,
    change: PlanChange,
    /// The opener already proposes day, time and place.
    compact: bool,
    roles: Roles,
    host: Option<&'static str>,
    /// How the opener addresses the others.
    address: String,
}

/// Builds one dialogue: the opener, the agreement on day/time/place with at most one change,
/// the third speaker's answer, small talk and a closing, within 3 to 9 turns.
struct DialogueBuilder<'r> {
    rng: &'r mut SeededRng,
    turns: Vec<Turn>,
}

struct Turn {
    speaker: &'static str,
    text: String,
    /// Answers the turn before it ("Good idea."): small talk is never put in between.
    attached: bool,
}

impl<'r> DialogueBuilder<'r> {
    fn new(rng: &'r mut SeededRng) -> Self {
        Self {
            rng,
            turns: Vec::new(),
        }
    }

    fn say(&mut self, speaker: &'static str, text: String) {
        self.turns.push(Turn {
            speaker,
            text,
            attached: false,
        });
    }

    fn answer(&mut self, speaker: &'static str, text: String) {
        self.turns.push(Turn {
            speaker,
            text,
            attached: true,
        });
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        *self.rng.pick(items)
    }

    /// Distinct entries of `items` (`n <= items.len()`).
    fn pick_distinct<T: Copy + PartialEq>(&mut self, items: &[T], n: usize) -> Vec<T> {
        let mut chosen = Vec::with_capacity(n);
        while chosen.len() < n {
            let item = self.pick(items);
            if !chosen.contains(&item) {
                chosen.push(item);
            }
        }
        chosen
    }

    fn build(mut self) -> (String, MeetingPlan) {
        let draft = self.draft();
        self.opener(&draft);
        let where_first = self.replies(&draft);
        if where_first {
            self.place_block(&draft, false, false);
            self.when_block(&draft, false);
        } else {
            self.when_block(&draft, draft.compact);
            self.place_block(&draft, draft.compact, true);
        }
        if let (Some(c), false) = (draft.c, draft.c_joins) {
            self.decline(c);
        }
        let participants: Vec<&'static str> = match draft.c {
            Some(c) if draft.c_joins => vec![draft.a, draft.b, c],
            _ => vec![draft.a, draft.b],
        };
        if self.turns.len() < 9 && self.rng.chance(0.7) {
            let closer = self.pick(&participants);
            let closing = self.pick(&[
                "See you then!",
                "Great, see you!",
                "Perfect :)",
                "Deal.",
                "Can't wait!",
                "Ok, see you there.",
            ]);
            self.say(closer, closing.into());
        }
        self.add_small_talk(&draft.speakers, &[draft.first_place, draft.place]);

        let turns = self.turns.len();
        let dialogue = self
            .turns
            .iter()
            .map(|turn| format!("{}: {}", turn.speaker, turn.text))
            .collect::<Vec<_>>()
            .join("\n");
        let plan = MeetingPlan {
            participants,
            absent: if draft.c_joins { None } else { draft.c },
            place: match draft.host {
                Some(host) => format!("{host}'s place"),
                None => draft.place.to_string(),
            },
            host: draft.host,
            day: draft.day,
            time: draft.time,
            activity: draft.activity,
            change: draft.change,
            turns,
        };
        (dialogue, plan)
    }

    /// Every choice of the plan that precedes the dialogue, drawn in this order (the corpus
    /// depends on it): speakers, activity, day, place and time, the change, the opener's form,
    /// the roles, the host and how the opener addresses the others.
    fn draft(&mut self) -> Draft {
        let three = self.rng.chance(0.3);
        let speakers = self.pick_distinct(&NAMES, if three { 3 } else { 2 });
        let (a, b) = (speakers[0], speakers[1]);
        let c = speakers.get(2).copied();
        let c_joins = c.is_some() && self.rng.chance(0.5);

        let activity = self.pick(&ACTIVITIES);
        let days = self.pick_distinct(&DAYS, 2);
        let places = self.pick_distinct(&PLACES, 2);
        let (mut day, mut time, mut place) = (days[0], self.pick(&TIMES), places[0]);
        let roll = self.rng.next_f64();
        let change = if roll < 0.30 {
            PlanChange::Day { proposed: day }
        } else if roll < 0.45 {
            PlanChange::Time { proposed: time }
        } else if roll < 0.55 {
            PlanChange::Place { proposed: place }
        } else {
            PlanChange::None
        };
        let first_time = time;
        match change {
            PlanChange::Day { .. } => day = days[1],
            PlanChange::Time { .. } => {
                while time == first_time {
                    time = self.pick(&TIMES);
                }
            }
            PlanChange::Place { .. } => place = places[1],
            PlanChange::None => {}
        }

        // Compact: the opener already proposes day, time and place.
        let compact = self.rng.chance(0.35);
        // Who makes the proposals, who objects.
        let proposer = if compact || self.rng.chance(0.7) {
            a
        } else {
            b
        };
        let other = if proposer == a { b } else { a };
        let objector = match c {
            Some(c) if c_joins && self.rng.chance(0.3) => c,
            _ => other,
        };
        let at_home = change == PlanChange::None && self.rng.chance(0.12);
        let address = if c.is_some() {
            self.pick(&["guys", "everyone", "all"]).to_string()
        } else {
            b.to_string()
        };
        Draft {
            a,
            b,
            c,
            c_joins,
            activity,
            first_day: days[0],
            day,
            first_time,
            time,
            first_place: places[0],
            place,
            change,
            compact,
            roles: Roles {
                proposer,
                other,
                objector,
            },
            host: at_home.then_some(proposer),
            address,
            speakers,
        }
    }

    /// The first turn: an invitation, with day, time and place when the draft is compact.
    fn opener(&mut self, d: &Draft) {
        let (address, activity) = (&d.address, d.activity);
        if d.compact {
            let place_text = if d.host.is_some() {
                "my place"
            } else {
                d.first_place
            };
            let when_where = format!("at {place_text} on {} at {}", d.first_day, d.first_time);
            let opener = match self.rng.below(4) {
                0 => format!("Hi {address}! Want to {activity} {when_where}?"),
                1 => format!("Hey {address}, shall we {activity} {when_where}?"),
                2 => format!("{}, let's {activity} {when_where}.", capitalize(address)),
                _ => format!("Would you like to {activity} {when_where}?"),
            };
            self.say(d.a, opener);
        } else {
            let opener = match self.rng.below(5) {
                0 => format!("Hi {address}! Do you want to {activity} this week?"),
                1 => format!("Hey {address}, shall we {activity} together?"),
                2 => format!(
                    "{}, are you free to {activity} sometime this week?",
                    capitalize(address)
                ),
                3 if d.c.is_some() => format!("I need to {activity}. Anyone up for it?"),
                3 => format!("I need to {activity}. Want to join me?"),
                _ => format!("Would you like to {activity} with me?"),
            };
            self.say(d.a, opener);
        }
    }

    /// The second speaker's reply and the third speaker's joining; returns whether the place
    /// is settled before the day and time.
    fn replies(&mut self, d: &Draft) -> bool {
        let where_first = !d.compact && self.rng.chance(0.3);
        let reply = if d.compact {
            self.pick(&[
                "Sure!",
                "Sounds good.",
                "Yes, perfect.",
                "Deal!",
                "Why not!",
            ])
        } else if where_first {
            self.pick(&["Sure!", "Sounds good.", "Yes, good idea.", "Why not!"])
        } else {
            self.pick(&[
                "Sure!",
                "Sounds good.",
                "Yes, good idea.",
                "Why not!",
                "Sure, when?",
                "Yes! When are you free?",
            ])
        };
        self.answer(d.b, reply.into());
        if let (Some(c), true) = (d.c, d.c_joins) {
            let joined = self.pick(&["Count me in!", "I'm in too.", "Me too!", "Can I join?"]);
            self.say(c, joined.into());
        }
        where_first
    }

    /// The third speaker declines, maybe with an excuse.
    fn decline(&mut self, c: &'static str) {
        let excuse = self.pick(&EXCUSES);
        let declined = match self.rng.below(4) {
            0 => "Sorry, I can't make it. Have fun!".to_string(),
            1 => format!("I can't come, I have {excuse}. Have fun!"),
            2 => "Count me out this time, sorry.".to_string(),
            _ => format!("I have {excuse} then, so I'll skip it."),
        };
        self.say(c, declined);
    }

    /// Day and time: the proposal (unless the compact opener made it), then an objection and
    /// its acceptance if the day or time changes.
    fn when_block(&mut self, d: &Draft, already_proposed: bool) {
        let Roles {
            proposer, objector, ..
        } = d.roles;
        let (first_day, day, first_time, time) = (d.first_day, d.day, d.first_time, d.time);
        if !already_proposed {
            let proposal = match self.rng.below(5) {
                0 => format!("How about {first_day} at {first_time}?"),
                1 => format!("Is {first_day} at {first_time} ok?"),
                2 => format!("What about {first_day}? Around {first_time}?"),
                3 => format!("I'm free on {first_day}. {first_time}?"),
                _ => format!("{first_day} at {first_time} works for me."),
            };
            self.say(proposer, proposal);
        }
        match d.change {
            PlanChange::Day { .. } => {
                let excuse = self.pick(&EXCUSES);
                let objection = match self.rng.below(4) {
                    0 => format!("I can't on {first_day}, I have {excuse}. What about {day}?"),
                    1 => format!("{first_day} is bad for me. Can we do {day}?"),
                    2 => format!("Not {first_day}, sorry. {day}?"),
                    _ => format!("I'm busy on {first_day}. Is {day} ok?"),
                };
                self.say(objector, objection);
                let accepted = match self.rng.below(4) {
                    0 => format!("{day} is fine."),
                    1 => format!("Ok, {day} then."),
                    2 => format!("Sure, {day} works."),
                    _ => "Fine by me.".to_string(),
                };
                self.answer(proposer, accepted);
            }
            PlanChange::Time { .. } => {
                let position = |t: &str| TIMES.iter().position(|x| *x == t);
                let give_reason = self.rng.chance(0.6);
                let objection = match (position(first_time), position(time)) {
                    (Some(first), Some(agreed)) if give_reason => {
                        let direction = if agreed > first { "early" } else { "late" };
                        format!("{first_time} is too {direction} for me. Can we make it {time}?")
                    }
                    _ => format!("Could we do {time} instead?"),
                };
                self.say(objector, objection);
                let accepted = match self.rng.below(4) {
                    0 => format!("{time} is ok."),
                    1 => format!("Ok, {time} then."),
                    2 => "Sure.".to_string(),
                    _ => format!("Fine, {time}."),
                };
                self.answer(proposer, accepted);
            }
            PlanChange::Place { .. } | PlanChange::None => {}
        }
    }

    /// The place: an optional question, the proposal (unless the compact opener made it),
    /// then an objection and its acceptance if the place changes.
    fn place_block(&mut self, d: &Draft, already_proposed: bool, day_known: bool) {
        let Roles {
            proposer,
            other,
            objector,
        } = d.roles;
        let (first_place, place) = (d.first_place, d.place);
        if !already_proposed {
            let asked = self.rng.chance(0.5);
            if asked {
                let question = self.pick(&["Where?", "Where shall we meet?", "Where do we meet?"]);
                self.say(other, question.into());
            }
            let proposal = match d.host {
                Some(_) => self
                    .pick(&[
                        "Let's meet at my place.",
                        "Come to my place.",
                        "At my place?",
                    ])
                    .to_string(),
                None => match self.rng.below(4) {
                    0 => format!("At {first_place}?"),
                    1 => format!("Let's meet at {first_place}."),
                    2 => format!("{}, as usual.", capitalize(first_place)),
                    _ => format!("How about {first_place}?"),
                },
            };
            if asked {
                self.answer(proposer, proposal);
            } else {
                self.say(proposer, proposal);
            }
        }
        if let PlanChange::Place { .. } = d.change {
            let objection = match self.rng.below(4) {
                0 if day_known => {
                    format!(
                        "{} is closed that day. Maybe {place}?",
                        capitalize(first_place)
                    )
                }
                0 => format!(
                    "{} is being renovated. Maybe {place}?",
                    capitalize(first_place)
                ),
                1 => format!("I'd rather go to {place}."),
                2 => format!(
                    "{} is too far for me. What about {place}?",
                    capitalize(first_place)
                ),
                _ => format!("Can we go to {place} instead?"),
            };
            self.say(objector, objection);
            let accepted = match self.rng.below(3) {
                0 => format!("Ok, {place} it is."),
                1 => format!("Sure, {place}."),
                _ => "Good idea.".to_string(),
            };
            self.answer(proposer, accepted);
        }
    }

    /// Up to three distractor turns anywhere after the opener, at least enough for 3 turns,
    /// never more than 9 turns in all. They name only places and people outside the plan.
    fn add_small_talk(&mut self, speakers: &[&'static str], plan_places: &[&'static str]) {
        let room = 9usize.saturating_sub(self.turns.len());
        let wanted = self
            .rng
            .below(4)
            .max(3usize.saturating_sub(self.turns.len()));
        for _ in 0..wanted.min(room) {
            let speaker = self.pick(speakers);
            let text = match self.rng.below(8) {
                0 => {
                    let mut elsewhere = self.pick(&PLACES);
                    while plan_places.contains(&elsewhere) {
                        elsewhere = self.pick(&PLACES);
                    }
                    format!("I was at {elsewhere} yesterday, it was packed.")
                }
                1 => {
                    let mut friend = self.pick(&NAMES);
                    while speakers.contains(&friend) {
                        friend = self.pick(&NAMES);
                    }
                    if self.rng.chance(0.5) {
                        format!("{friend} says hi!")
                    } else {
                        format!("Did you hear from {friend}?")
                    }
                }
                _ => self.pick(&SMALL_TALK).to_string(),
            };
            // After the opener, never between a turn and its answer.
            let free: Vec<usize> = (1..=self.turns.len())
                .filter(|&at| self.turns.get(at).is_none_or(|turn| !turn.attached))
                .collect();
            let at = self.pick(&free);
            self.turns.insert(
                at,
                Turn {
                    speaker,
                    text,
                    attached: false,
                },
            );
        }
    }
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Why generating, training or writing the bundle failed.
#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    #[error("invalid synthetic data settings: {0}")]
    Config(String),
    #[error("tokenizer training failed: {0}")]
    Tokenizer(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serialize {what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the embedded bundle is unreadable ({what}): {reason}")]
    Embedded { what: &'static str, reason: String },
}

/// The input prefix of FLAN-T5 summarization, trained into the vocabulary ("▁summarize", ":").
const TASK_PREFIX: &str = "summarize:";

/// EM sub-iterations of the Unigram trainer (its default is 2). The corpus supports fewer
/// pieces than asked for, so the trainer never prunes, and with 2 rounds the marginals stay
/// soft enough to keep ~120 pieces that encoding never uses ("Tom" beside "▁Tom").
const SUB_ITERATIONS: u32 = 8;

/// Trains a T5-style Unigram tokenizer on the dialogues and summaries of `records`:
/// `<pad>`=0, `</s>`=1, `<unk>`=2; normalizer NFKC + collapse of repeated spaces;
/// pre-tokenizer WhitespaceSplit + Metaspace(`▁`, always prepended) so newlines vanish as in
/// T5; post-processor `$A </s>` (`$A </s> $B </s>` for pairs); decoder Metaspace. Every
/// printable ASCII character is in the vocabulary, so ASCII text never maps to `<unk>`.
///
/// `vocab_size` includes the special tokens; the trainer may return fewer pieces when the
/// corpus has too few distinct substrings. Training is not bit-exact across runs (tied
/// pieces may swap ids), which is why the bundle commits its `tokenizer.json`.
pub fn train_tokenizer(
    records: &[SamsumRecord],
    vocab_size: usize,
) -> Result<Tokenizer, SyntheticError> {
    if records.is_empty() {
        return Err(SyntheticError::Config(
            "cannot train a tokenizer on no records".into(),
        ));
    }
    let vocab_size = u32::try_from(vocab_size)
        .map_err(|_| SyntheticError::Config(format!("vocab size {vocab_size} is too large")))?;
    let specials = ["<pad>", "</s>", "<unk>"];
    let trainer = UnigramTrainer::builder()
        .show_progress(false)
        .vocab_size(vocab_size)
        .special_tokens(
            specials
                .iter()
                .map(|token| AddedToken::from(*token, true))
                .collect(),
        )
        .unk_token(Some("<unk>".into()))
        .n_sub_iterations(SUB_ITERATIONS)
        .initial_alphabet((' '..='~').filter(|c| !c.is_whitespace()).collect())
        .build()
        .map_err(|err| SyntheticError::Tokenizer(err.to_string()))?;

    let metaspace = Metaspace::new('▁', PrependScheme::Always, true);
    let collapse_spaces = Replace::new(ReplacePattern::Regex(" {2,}".into()), " ")
        .map_err(|err| SyntheticError::Tokenizer(err.to_string()))?;
    let template = TemplateProcessing::builder()
        .try_single("$A </s>")
        .and_then(|builder| builder.try_pair("$A </s> $B </s>"))
        .map_err(|err| SyntheticError::Tokenizer(err.to_string()))?
        .special_tokens(vec![("</s>", 1)])
        .build()
        .map_err(|err| SyntheticError::Tokenizer(err.to_string()))?;

    let mut tokenizer = Tokenizer::new(Unigram::default());
    tokenizer
        .with_normalizer(Some(NormalizerWrapper::from(NormalizerSequence::new(
            vec![NFKC.into(), collapse_spaces.into()],
        ))))
        .with_pre_tokenizer(Some(PreTokenizerWrapper::from(PreTokenizerSequence::new(
            vec![WhitespaceSplit.into(), metaspace.clone().into()],
        ))))
        .with_post_processor(Some(template))
        .with_decoder(Some(DecoderWrapper::from(metaspace)));

    let sentences = training_words(&tokenizer, records)?;
    let mut model = Unigram::default();
    let special_tokens = trainer
        .do_train(sentences, &mut model)
        .map_err(|err| SyntheticError::Tokenizer(err.to_string()))?;
    tokenizer.with_model(model);
    tokenizer.add_special_tokens(&special_tokens);
    Ok(tokenizer)
}

/// The trainer's input: every word occurrence of the dialogues, the summaries and the task
/// prefix, normalized and pre-tokenized as at encode time and cut at punctuation (see
/// [`word_parts`]), each part as its own `(part, 1)` entry; plus every distinct part doubled
/// ("▁library" -> "▁librarylibrary") as a `(_, 0)` entry.
///
/// Why not `Tokenizer::train`: it hands the trainer each distinct word once with its count,
/// and the trainer seeds candidate pieces from substring counts over that list, blind to the
/// word counts. On a narrow corpus a whole word is then a candidate only if another word
/// contains it (the trainer seeds pieces only from substrings seen in several distinct words),
/// and even with an extra training line listing every word twice ("w ww") frequent short words
/// lose to single characters, whose seeds *are* count-weighted: asked for 1500 pieces it
/// split "and" into "▁an" + "d" and "Hey" into three pieces, while spending pieces on
/// "▁Monday?" and "▁coffee.". Here:
/// - one entry per occurrence gives SentencePiece's count-weighted seeds (the EM result is
///   the same as with `(word, count)` entries);
/// - the doubled entry is the workaround for that seeding: a seed must be a substring that continues
///   differently in two places, which a word alone (always followed by the end of the
///   entry) is not; with count 0 it does not change the EM;
/// - cutting at punctuation keeps "▁Monday", "▁pm" and "▁Tom" the same piece in "Tom:",
///   "Monday?" and the summary, so the model copies ids instead of learning that
///   "▁Monday?" means "▁Monday". Encoding still sees whole words; they come out as
///   "▁Monday" + "?".
fn training_words(
    tokenizer: &Tokenizer,
    records: &[SamsumRecord],
) -> Result<Vec<(String, u32)>, SyntheticError> {
    let (Some(normalizer), Some(pre_tokenizer)) =
        (tokenizer.get_normalizer(), tokenizer.get_pre_tokenizer())
    else {
        return Err(SyntheticError::Tokenizer(
            "normalizer and pre-tokenizer must be set before training".into(),
        ));
    };
    let mut counts: std::collections::BTreeMap<String, u32> = std::collections::BTreeMap::new();
    let texts = records
        .iter()
        .flat_map(|r| [r.dialogue.as_str(), r.summary.as_str()])
        .chain(std::iter::once(TASK_PREFIX));
    for text in texts {
        let mut normalized = NormalizedString::from(text);
        normalizer
            .normalize(&mut normalized)
            .map_err(|err| SyntheticError::Tokenizer(err.to_string()))?;
        let mut words = PreTokenizedString::from(normalized);
        pre_tokenizer
            .pre_tokenize(&mut words)
            .map_err(|err| SyntheticError::Tokenizer(err.to_string()))?;
        for (word, _, _) in words.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            for part in word_parts(word) {
                *counts.entry(part.to_string()).or_default() += 1;
            }
        }
    }
    let total = counts.values().map(|&c| c as usize + 1).sum();
    let mut sentences = Vec::with_capacity(total);
    for (part, count) in counts {
        for _ in 0..count {
            sentences.push((part.clone(), 1));
        }
        sentences.push((format!("{part}{}", part.trim_start_matches('▁')), 0));
    }
    Ok(sentences)
}

/// A pre-tokenized word ("▁Monday?", "▁Tom's", "▁:)") cut into leading punctuation, the
/// alphanumeric core, a possessive "'s" and trailing punctuation; the first part keeps the
/// "▁". Inner punctuation stays ("▁can't", "▁I'm"); a word without letters or digits is
/// one part.
fn word_parts(word: &str) -> Vec<&str> {
    let is_core = |c: char| c.is_alphanumeric();
    let body_start = word.strip_prefix('▁').map_or(0, |_| '▁'.len_utf8());
    let (Some(core_start), Some(core_end)) = (
        word[body_start..].find(is_core).map(|i| body_start + i),
        word.rfind(is_core)
            .map(|i| i + word[i..].chars().next().map_or(1, char::len_utf8)),
    ) else {
        return vec![word];
    };
    let mut cuts = vec![0];
    if core_start > body_start {
        cuts.push(core_start);
    }
    if word[core_start..core_end].len() > 2 && word[..core_end].ends_with("'s") {
        cuts.push(core_end - 2);
    }
    cuts.push(core_end);
    cuts.push(word.len());
    cuts.dedup();
    cuts.windows(2).map(|w| &word[w[0]..w[1]]).collect()
}

/// `config.json` of the tiny FLAN-style T5 for a tokenizer of `tokenizer_vocab` ids:
/// gated-GELU, untied head, d_model 128, 4 heads x 32, d_ff 256, 3 + 3 layers, model vocab
/// rounded up to a multiple of 8.
pub fn tiny_t5_config(tokenizer_vocab: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": tokenizer_vocab.div_ceil(8) * 8,
        "d_model": 128,
        "d_kv": 32,
        "num_heads": 4,
        "d_ff": 256,
        "num_layers": 3,
        "num_decoder_layers": 3,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.0,
        "layer_norm_epsilon": 1e-6,
        "initializer_factor": 1.0,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": true,
        "is_encoder_decoder": true,
        "tie_word_embeddings": false,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "use_cache": true
    })
}

/// What [`write_bundle`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSummary {
    pub train_examples: usize,
    pub eval_examples: usize,
    /// Ids of the trained tokenizer, special tokens included.
    pub tokenizer_vocab: usize,
    /// `vocab_size` of the written `config.json`.
    pub model_vocab: usize,
}

/// Number of evaluation examples [`write_bundle`] writes for `train_examples`: one per 20,
/// at least one.
pub fn eval_examples_for(train_examples: usize) -> usize {
    (train_examples / 20).max(1)
}

/// Writes `train.jsonl` (`config.examples` records), `eval.jsonl` (the next
/// [`eval_examples_for`] records of the same stream, so ids continue and no example is
/// shared), `tokenizer.json` (trained on the training records, [`TOKENIZER_VOCAB_SIZE`]) and
/// `config.json` ([`tiny_t5_config`]) into `dir`, creating it if needed.
pub fn write_bundle(dir: &Path, config: &SyntheticConfig) -> Result<BundleSummary, SyntheticError> {
    if config.examples == 0 {
        return Err(SyntheticError::Config(
            "the bundle needs at least one training example".into(),
        ));
    }
    let eval_examples = eval_examples_for(config.examples);
    let mut records = generate_corpus(&SyntheticConfig {
        examples: config.examples + eval_examples,
        seed: config.seed,
    });
    let eval = records.split_off(config.examples);
    let train = records;

    let tokenizer = train_tokenizer(&train, TOKENIZER_VOCAB_SIZE)?;
    let tokenizer_vocab = tokenizer.get_vocab_size(true);
    let tokenizer_json = tokenizer
        .to_string(true)
        .map_err(|err| SyntheticError::Tokenizer(err.to_string()))?;
    let model_config = tiny_t5_config(tokenizer_vocab);
    let model_vocab = model_config["vocab_size"]
        .as_u64()
        .map_or(tokenizer_vocab, |v| v as usize);
    let config_json =
        serde_json::to_string_pretty(&model_config).map_err(|source| SyntheticError::Json {
            what: "config.json",
            source,
        })?;

    std::fs::create_dir_all(dir).map_err(|source| SyntheticError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    write_file(&dir.join("train.jsonl"), &to_jsonl(&train)?)?;
    write_file(&dir.join("eval.jsonl"), &to_jsonl(&eval)?)?;
    write_file(&dir.join("tokenizer.json"), &tokenizer_json)?;
    write_file(&dir.join("config.json"), &(config_json + "\n"))?;
    Ok(BundleSummary {
        train_examples: train.len(),
        eval_examples: eval.len(),
        tokenizer_vocab,
        model_vocab,
    })
}

/// One JSON object per line, fields in the order `id`, `dialogue`, `summary`.
pub fn to_jsonl(records: &[SamsumRecord]) -> Result<String, SyntheticError> {
    let mut out = String::new();
    for record in records {
        let line = serde_json::to_string(record).map_err(|source| SyntheticError::Json {
            what: "a record",
            source,
        })?;
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

fn write_file(path: &Path, contents: &str) -> Result<(), SyntheticError> {
    std::fs::write(path, contents).map_err(|source| SyntheticError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The committed bundle (`fixtures/synthetic/`), compiled into the library.
pub mod embedded {
    use super::*;

    pub const TRAIN_JSONL: &str = include_str!("../../fixtures/synthetic/train.jsonl");
    pub const EVAL_JSONL: &str = include_str!("../../fixtures/synthetic/eval.jsonl");
    pub const TOKENIZER_JSON: &str = include_str!("../../fixtures/synthetic/tokenizer.json");
    pub const CONFIG_JSON: &str = include_str!("../../fixtures/synthetic/config.json");

    pub fn train_records() -> Result<Vec<SamsumRecord>, SyntheticError> {
        parse_samsum(TRAIN_JSONL).map_err(|err| SyntheticError::Embedded {
            what: "train.jsonl",
            reason: err.to_string(),
        })
    }

    pub fn eval_records() -> Result<Vec<SamsumRecord>, SyntheticError> {
        parse_samsum(EVAL_JSONL).map_err(|err| SyntheticError::Embedded {
            what: "eval.jsonl",
            reason: err.to_string(),
        })
    }

    pub fn tokenizer() -> Result<Tokenizer, SyntheticError> {
        TOKENIZER_JSON
            .parse()
            .map_err(|err: tokenizers::Error| SyntheticError::Embedded {
                what: "tokenizer.json",
                reason: err.to_string(),
            })
    }

    /// Writes the four committed files into `dir` (for commands that take paths).
    pub fn write_to(dir: &Path) -> Result<(), SyntheticError> {
        std::fs::create_dir_all(dir).map_err(|source| SyntheticError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        for (name, contents) in [
            ("train.jsonl", TRAIN_JSONL),
            ("eval.jsonl", EVAL_JSONL),
            ("tokenizer.json", TOKENIZER_JSON),
            ("config.json", CONFIG_JSON),
        ] {
            write_file(&dir.join(name), contents)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(n: usize, seed: u64) -> Vec<SyntheticExample> {
        generate_examples(&SyntheticConfig { examples: n, seed })
    }

    /// Byte offsets of `needle` as a whole token (not inside "12 pm" when looking for "2 pm",
    /// not inside "Sam's" when looking for "Sa").
    fn mentions(text: &str, needle: &str) -> Vec<usize> {
        text.match_indices(needle)
            .filter(|(at, _)| {
                let before = text[..*at].chars().next_back();
                let after = text[at + needle.len()..].chars().next();
                !before.is_some_and(char::is_alphanumeric)
                    && !after.is_some_and(char::is_alphanumeric)
            })
            .map(|(at, _)| at)
            .collect()
    }

    fn last_mention<'a>(text: &str, candidates: &[&'a str]) -> Option<&'a str> {
        candidates
            .iter()
            .filter_map(|c| mentions(text, c).last().map(|&at| (at, *c)))
            .max_by_key(|(at, _)| *at)
            .map(|(_, c)| c)
    }

    #[test]
    fn deterministic_for_a_seed_and_prefix_stable() {
        let a = generate_corpus(&SyntheticConfig {
            examples: 200,
            seed: 7,
        });
        let b = generate_corpus(&SyntheticConfig {
            examples: 300,
            seed: 7,
        });
        assert_eq!(a[..], b[..200]);
        let c = generate_corpus(&SyntheticConfig {
            examples: 200,
            seed: 8,
        });
        assert_ne!(a, c);
        assert_eq!(a[42].id, "synth-000042");
    }

    #[test]
    fn summary_facts_appear_in_the_dialogue() {
        for example in examples(3000, 1) {
            let (record, plan) = (&example.record, &example.plan);
            let dialogue = &record.dialogue;
            assert_eq!(record.summary, summary_of(plan));
            for name in plan.participants.iter().chain(plan.absent.iter()) {
                assert!(
                    dialogue
                        .lines()
                        .any(|l| l.starts_with(&format!("{name}: "))),
                    "{name} does not speak in\n{dialogue}"
                );
                // Once, besides "NAME's place".
                let people = record.summary.replace(&plan.place, "");
                assert_eq!(mentions(&people, name).len(), 1, "{record:?}");
            }
            match plan.host {
                Some(host) => assert!(
                    dialogue
                        .lines()
                        .any(|l| l.starts_with(&format!("{host}: ")) && l.contains("my place")),
                    "{record:?}"
                ),
                None => assert!(dialogue.to_lowercase().contains(&plan.place), "{record:?}"),
            }
            assert!(!mentions(dialogue, plan.day).is_empty(), "{record:?}");
            assert!(!mentions(dialogue, plan.time).is_empty(), "{record:?}");
            assert!(dialogue.contains(plan.activity), "{record:?}");
        }
    }

    #[test]
    fn the_agreed_value_is_the_last_one_mentioned() {
        let mut changed = [0usize; 3];
        for example in examples(3000, 2) {
            let (record, plan) = (&example.record, &example.plan);
            let dialogue = &record.dialogue;
            assert_eq!(last_mention(dialogue, &DAYS), Some(plan.day), "{record:?}");
            assert_eq!(
                last_mention(dialogue, &TIMES),
                Some(plan.time),
                "{record:?}"
            );
            match plan.change {
                PlanChange::Day { proposed } => {
                    changed[0] += 1;
                    assert_ne!(proposed, plan.day);
                    let first = mentions(dialogue, proposed)[0];
                    assert!(first < *mentions(dialogue, plan.day).last().unwrap_or(&0));
                    assert!(mentions(&record.summary, proposed).is_empty(), "{record:?}");
                }
                PlanChange::Time { proposed } => {
                    changed[1] += 1;
                    assert_ne!(proposed, plan.time);
                    assert!(mentions(&record.summary, proposed).is_empty(), "{record:?}");
                }
                PlanChange::Place { proposed } => {
                    changed[2] += 1;
                    assert_ne!(proposed, plan.place);
                    let first = dialogue.to_lowercase().find(proposed).unwrap_or(usize::MAX);
                    let last = dialogue.to_lowercase().rfind(&plan.place).unwrap_or(0);
                    assert!(first < last, "{record:?}");
                    assert!(!record.summary.contains(proposed), "{record:?}");
                }
                PlanChange::None => {}
            }
        }
        // About 30 / 15 / 10 % of 3000.
        assert!(changed.iter().all(|&n| n > 200), "{changed:?}");
    }

    #[test]
    fn shape_of_the_dialogues() {
        let all = examples(4000, 3);
        let mut three = 0;
        let mut absent = 0;
        let mut at_home = 0;
        for example in &all {
            let lines: Vec<&str> = example.record.dialogue.lines().collect();
            assert!((3..=9).contains(&lines.len()), "{:?}", example.record);
            assert_eq!(lines.len(), example.plan.turns);
            let speakers: std::collections::BTreeSet<&str> =
                lines.iter().filter_map(|l| l.split(": ").next()).collect();
            assert!((2..=3).contains(&speakers.len()), "{:?}", example.record);
            three += usize::from(speakers.len() == 3);
            absent += usize::from(example.plan.absent.is_some());
            at_home += usize::from(example.plan.host.is_some());
        }
        assert!((900..1500).contains(&three), "{three}");
        assert!(absent > 400 && at_home > 100, "{absent} {at_home}");
        // The vocabulary is used in full.
        let text: String = all.iter().map(|e| e.record.summary.as_str()).collect();
        for word in NAMES.iter().chain(&DAYS).chain(&TIMES).chain(&ACTIVITIES) {
            assert!(text.contains(word), "{word} never used");
        }
        for place in PLACES {
            assert!(text.contains(place), "{place} never used");
        }
    }

    #[test]
    fn summaries_read_like_the_brief() {
        let plan = MeetingPlan {
            participants: vec!["Anna", "Tom"],
            absent: None,
            place: "the library".into(),
            host: None,
            day: "Tuesday",
            time: "5 pm",
            activity: "study",
            change: PlanChange::None,
            turns: 4,
        };
        assert_eq!(
            summary_of(&plan),
            "Anna and Tom will meet at the library on Tuesday at 5 pm to study."
        );
        let plan = MeetingPlan {
            participants: vec!["Anna", "Tom", "Kate"],
            absent: Some("Ben"),
            place: "Tom's place".into(),
            ..plan
        };
        assert_eq!(
            summary_of(&plan),
            "Anna, Tom and Kate will meet at Tom's place on Tuesday at 5 pm to study. Ben can't come."
        );
    }

    #[test]
    fn words_are_cut_at_punctuation() {
        let cases: [(&str, &[&str]); 9] = [
            ("▁Monday?", &["▁Monday", "?"]),
            ("▁Tom:", &["▁Tom", ":"]),
            ("▁Tom's", &["▁Tom", "'s"]),
            ("▁can't", &["▁can't"]),
            ("▁(hi!)", &["▁(", "hi", "!)"]),
            ("▁:)", &["▁:)"]),
            ("▁8", &["▁8"]),
            ("▁café.", &["▁café", "."]),
            ("▁'s", &["▁'", "s"]),
        ];
        for (word, parts) in cases {
            assert_eq!(word_parts(word), parts, "{word}");
        }
    }

    #[test]
    fn config_has_the_tiny_flan_shape() {
        let config: crate::T5Config =
            serde_json::from_value(tiny_t5_config(1001)).expect("T5Config");
        config.validate().expect("valid");
        assert_eq!(config.vocab_size, 1008);
        assert_eq!(
            (config.d_model, config.num_heads, config.d_kv),
            (128, 4, 32)
        );
        assert!(!config.tie_word_embeddings);
        assert_eq!(tiny_t5_config(1008)["vocab_size"], 1008);
    }
}
