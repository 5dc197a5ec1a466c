//! The second synthetic task, harder than the bundled one and different from it: a group of
//! three to five people plans an outing and shares out what each of them brings. It is the
//! corpus of the compression frontier's long-local-phase and fine-tuning workloads
//! (`fixtures/potluck/`, written by `meshtune data potluck`).
//!
//! Owns: the grammar of these dialogues and their reference summaries. Must not train, split
//! or tokenize (it reuses the bundled tokenizer: every word is spelled with pieces it has, as
//! `tests` checks).
//!
//! What makes it harder than the meeting task: more facts per dialogue (the place, day, time,
//! activity and one item per participant), more speakers, up to three corrections (a day, a
//! time or a place moved; an item changed; two people swapping items, which the summary
//! must follow), one or two people declining, and small talk in between.

use crate::data::SamsumRecord;
use crate::seeded_rng::SeededRng;
use crate::synthetic::{ACTIVITIES, DAYS, NAMES, PLACES, TIMES};

/// What a participant can bring, as it appears after "brings" in a summary.
pub const ITEMS: [&str; 20] = [
    "the snacks",
    "the drinks",
    "the music",
    "the plates",
    "the cake",
    "the games",
    "the chairs",
    "the salad",
    "the bread",
    "the fruit",
    "the cups",
    "the ball",
    "the camera",
    "the blanket",
    "the napkins",
    "the juice",
    "the cookies",
    "the speaker",
    "the tent",
    "the cards",
];

const SMALL_TALK: [&str; 10] = [
    "It's supposed to rain all week.",
    "So hot today!",
    "I'm starving.",
    "Haha",
    "lol",
    "I'm so tired today.",
    "Work is crazy this week.",
    "I need a holiday.",
    "My phone is almost dead.",
    "Did you see the game last night?",
];

const EXCUSES: [&str; 5] = [
    "work",
    "an exam",
    "a family dinner",
    "a meeting",
    "football practice",
];

/// The facts of one dialogue, as its summary states them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outing {
    /// Who comes, the organiser first, each with what they bring (after every correction).
    pub duties: Vec<(&'static str, &'static str)>,
    /// Who declined, in the order they said so.
    pub absent: Vec<&'static str>,
    pub place: &'static str,
    pub day: &'static str,
    pub time: &'static str,
    pub activity: &'static str,
    /// Corrections in the dialogue (a moved day/time/place, a changed or swapped item).
    pub corrections: usize,
}

/// The reference summary: who meets where, when and for what; who brings what; who can't come.
pub fn summary_of(outing: &Outing) -> String {
    let names: Vec<&str> = outing.duties.iter().map(|(name, _)| *name).collect();
    let mut summary = format!(
        "{} will meet at {} on {} at {} to {}.",
        join_and(&names),
        outing.place,
        outing.day,
        outing.time,
        outing.activity
    );
    let duties: Vec<String> = outing
        .duties
        .iter()
        .map(|(name, item)| format!("{name} brings {item}"))
        .collect();
    summary.push_str(&format!(" {}.", join_and(&duties)));
    if !outing.absent.is_empty() {
        summary.push_str(&format!(" {} can't come.", join_and(&outing.absent)));
    }
    summary
}

fn join_and<S: AsRef<str>>(parts: &[S]) -> String {
    match parts {
        [] => String::new(),
        [one] => one.as_ref().to_string(),
        [init @ .., last] => {
            let init: Vec<&str> = init.iter().map(AsRef::as_ref).collect();
            format!("{} and {}", init.join(", "), last.as_ref())
        }
    }
}

/// Example `index` of the corpus with `seed` (ids `potluck-000000`, ...): a stream per
/// example, so a longer corpus extends a shorter one.
pub fn generate_example(seed: u64, index: usize) -> (SamsumRecord, Outing) {
    let mut rng = SeededRng::new(seed ^ SeededRng::new(index as u64 ^ 0x5eed).next_u64());
    let mut rng = SeededRng::new(rng.next_u64());
    let (dialogue, outing) = Builder::new(&mut rng).build();
    let record = SamsumRecord {
        id: format!("potluck-{index:06}"),
        dialogue,
        summary: summary_of(&outing),
    };
    (record, outing)
}

/// `examples` records of the corpus with `seed`.
pub fn generate_corpus(seed: u64, examples: usize) -> Vec<SamsumRecord> {
    (0..examples)
        .map(|index| generate_example(seed, index).0)
        .collect()
}

/// What `fixtures/potluck/` holds: 6000 training records, then 200 evaluation records of
/// the same stream (seed 7).
pub const FIXTURE_SEED: u64 = 7;
pub const FIXTURE_TRAIN: usize = 6000;
pub const FIXTURE_EVAL: usize = 200;

struct Builder<'r> {
    rng: &'r mut SeededRng,
    turns: Vec<(&'static str, String)>,
    corrections: usize,
}

impl<'r> Builder<'r> {
    fn new(rng: &'r mut SeededRng) -> Self {
        Self {
            rng,
            turns: Vec::new(),
            corrections: 0,
        }
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        *self.rng.pick(items)
    }

    fn distinct<T: Copy + PartialEq>(&mut self, items: &[T], n: usize) -> Vec<T> {
        let mut chosen = Vec::with_capacity(n);
        while chosen.len() < n {
            let item = self.pick(items);
            if !chosen.contains(&item) {
                chosen.push(item);
            }
        }
        chosen
    }

    /// Another entry of `items` than `not`.
    fn other<T: Copy + PartialEq>(&mut self, items: &[T], not: T) -> T {
        loop {
            let item = self.pick(items);
            if item != not {
                return item;
            }
        }
    }

    fn say(&mut self, speaker: &'static str, text: String) {
        self.turns.push((speaker, text));
    }

    fn build(mut self) -> (String, Outing) {
        let coming = 3 + self.rng.below(3);
        let declining = usize::from(self.rng.chance(0.5)) + usize::from(self.rng.chance(0.15));
        let people = self.distinct(&NAMES, coming + declining);
        let (coming, declining) = people.split_at(coming);
        let organiser = coming[0];
        let activity = self.pick(&ACTIVITIES);
        let (day, time, place) = self.when_and_where(organiser, coming, activity);
        let items = self.distinct(&ITEMS, coming.len() + 1);
        let mut duties: Vec<(&'static str, &'static str)> =
            coming.iter().copied().zip(items.iter().copied()).collect();
        let spare = items[coming.len()];
        for &(name, item) in &duties {
            let text = match self.rng.below(3) {
                0 => format!("I'll bring {item}."),
                1 => format!("I can bring {item}."),
                _ => format!("{item} from me."),
            };
            self.say(name, capitalise(&text));
        }
        for &name in declining {
            let excuse = self.pick(&EXCUSES);
            self.say(name, format!("Sorry, I can't make it, I have {excuse}."));
        }
        self.change_items(&mut duties, spare);
        self.small_talk(coming);
        let outing = Outing {
            duties,
            absent: declining.to_vec(),
            place,
            day,
            time,
            activity,
            corrections: self.corrections,
        };
        let dialogue = self
            .turns
            .iter()
            .map(|(speaker, text)| format!("{speaker}: {text}"))
            .collect::<Vec<_>>()
            .join("\n");
        (dialogue, outing)
    }
}

/// Capitalises the first letter ("the snacks from me." -> "The snacks from me.").
fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

impl Builder<'_> {
    /// The opener, the agreement on day, time and place (each may be moved once), and who
    /// is in. Returns the agreed day, time and place.
    fn when_and_where(
        &mut self,
        organiser: &'static str,
        coming: &[&'static str],
        activity: &'static str,
    ) -> (&'static str, &'static str, &'static str) {
        let day = self.pick(&DAYS);
        let time = self.pick(&TIMES);
        let place = self.pick(&PLACES);
        self.say(
            organiser,
            format!("Hi all! Who wants to {activity} on {day} at {time}?"),
        );
        let second = coming[1];
        let day = if self.rng.chance(0.3) {
            let moved = self.other(&DAYS, day);
            self.say(second, format!("{day} is bad for me. What about {moved}?"));
            self.say(organiser, format!("Ok, {moved} then."));
            self.corrections += 1;
            moved
        } else {
            self.say(second, "I'm in!".into());
            day
        };
        let time = if self.rng.chance(0.3) {
            let moved = self.other(&TIMES, time);
            let asker = self.pick(&coming[1..]);
            self.say(asker, format!("Can we make it {moved} instead?"));
            self.say(organiser, format!("Sure, {moved}."));
            self.corrections += 1;
            moved
        } else {
            time
        };
        for &name in &coming[2..] {
            self.say(name, "Count me in.".into());
        }
        let asker = self.pick(&coming[1..]);
        self.say(asker, "Where?".into());
        self.say(organiser, format!("At {place}."));
        let place = if self.rng.chance(0.3) {
            let moved = self.other(&PLACES, place);
            let objector = self.pick(&coming[1..]);
            self.say(
                objector,
                capitalise(&format!("{place} is closed that day. Let's go to {moved}.")),
            );
            self.say(organiser, format!("Good idea, {moved} it is."));
            self.corrections += 1;
            moved
        } else {
            place
        };
        (day, time, place)
    }

    /// At most one item change and one swap, each announced in the dialogue.
    fn change_items(&mut self, duties: &mut [(&'static str, &'static str)], spare: &'static str) {
        if self.rng.chance(0.35) {
            let who = self.rng.below(duties.len());
            let (name, old) = duties[who];
            self.say(
                name,
                format!("Actually, I'll bring {spare} instead of {old}."),
            );
            duties[who].1 = spare;
            self.corrections += 1;
        }
        if self.rng.chance(0.35) {
            let first = self.rng.below(duties.len());
            let second = (first + 1 + self.rng.below(duties.len() - 1)) % duties.len();
            let (a, a_item) = duties[first];
            let (b, b_item) = duties[second];
            self.say(
                a,
                format!("{b}, can we swap? I'll bring {b_item} and you bring {a_item}."),
            );
            self.say(b, "Sure, no problem.".into());
            duties[first].1 = b_item;
            duties[second].1 = a_item;
            self.corrections += 1;
        }
    }

    /// One or two turns of small talk, inserted between turns.
    fn small_talk(&mut self, coming: &[&'static str]) {
        for _ in 0..1 + self.rng.below(2) {
            let speaker = self.pick(coming);
            let text = self.pick(&SMALL_TALK);
            let at = 1 + self.rng.below(self.turns.len());
            self.turns.insert(at, (speaker, text.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::embedded;

    fn sample(n: usize) -> Vec<(SamsumRecord, Outing)> {
        (0..n).map(|i| generate_example(FIXTURE_SEED, i)).collect()
    }

    #[test]
    fn every_fact_of_the_summary_is_in_the_dialogue() {
        for (record, outing) in sample(500) {
            let text = &record.dialogue;
            for (name, item) in &outing.duties {
                assert!(text.contains(&format!("{name}:")), "{name} speaks: {text}");
                assert!(text.to_lowercase().contains(item), "{item}: {text}");
            }
            for fact in [outing.place, outing.day, outing.time, outing.activity] {
                assert!(text.contains(fact), "{fact}: {text}");
            }
            for name in &outing.absent {
                assert!(text.contains(&format!("{name}: Sorry")), "{name}: {text}");
            }
            assert_eq!(record.summary, summary_of(&outing));
        }
    }

    #[test]
    fn the_corpus_is_harder_than_the_meeting_task_and_varied() {
        let outings: Vec<Outing> = sample(1000).into_iter().map(|(_, o)| o).collect();
        let count = |f: &dyn Fn(&Outing) -> bool| outings.iter().filter(|o| f(o)).count();
        assert!(outings.iter().all(|o| (3..=5).contains(&o.duties.len())));
        assert!(count(&|o| o.duties.len() == 5) > 200);
        assert!(count(&|o| o.corrections >= 2) > 150);
        assert!(count(&|o| o.absent.len() == 2) > 30);
        assert!(count(&|o| o.corrections == 0) > 100);
        // Items are distinct within a dialogue, after every change and swap.
        for outing in &outings {
            let mut items: Vec<_> = outing.duties.iter().map(|(_, item)| *item).collect();
            items.sort_unstable();
            items.dedup();
            assert_eq!(items.len(), outing.duties.len());
        }
    }

    #[test]
    fn a_swap_is_followed_by_the_summary() {
        let (record, outing) = sample(2000)
            .into_iter()
            .find(|(r, _)| r.dialogue.contains("can we swap?"))
            .expect("some dialogue swaps items");
        let line = record
            .dialogue
            .lines()
            .find(|l| l.contains("can we swap?"))
            .expect("test value");
        let (asker, rest) = line.split_once(": ").expect("test value");
        let taken = rest
            .split("I'll bring ")
            .nth(1)
            .and_then(|r| r.split(" and you").next())
            .expect("test value");
        assert!(
            outing
                .duties
                .iter()
                .any(|(n, i)| *n == asker && *i == taken)
        );
    }

    #[test]
    fn the_stream_is_seeded_and_extends() {
        assert_eq!(
            generate_corpus(3, 20),
            generate_corpus(3, 40)[..20].to_vec()
        );
        assert_ne!(generate_corpus(3, 20), generate_corpus(4, 20));
    }

    #[test]
    fn the_bundled_tokenizer_spells_it_without_unknown_pieces_and_it_fits() {
        let tokenizer = embedded::tokenizer().expect("test value");
        let unk = tokenizer.token_to_id("<unk>").expect("test value");
        for (record, _) in sample(300) {
            let source = tokenizer
                .encode(record.dialogue.as_str(), true)
                .expect("test value");
            let target = tokenizer
                .encode(record.summary.as_str(), true)
                .expect("test value");
            assert!(!source.get_ids().contains(&unk), "{}", record.dialogue);
            assert!(!target.get_ids().contains(&unk), "{}", record.summary);
            assert!(source.len() < 512 && target.len() < 128, "{}", record.id);
        }
    }

    #[test]
    fn the_committed_fixture_is_this_generator() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/potluck/");
        let train = std::fs::read_to_string(format!("{root}train.jsonl")).expect("test value");
        let eval = std::fs::read_to_string(format!("{root}eval.jsonl")).expect("test value");
        let records = generate_corpus(FIXTURE_SEED, FIXTURE_TRAIN + FIXTURE_EVAL);
        let (want_train, want_eval) = records.split_at(FIXTURE_TRAIN);
        assert_eq!(
            train,
            crate::synthetic::to_jsonl(want_train).expect("test value")
        );
        assert_eq!(
            eval,
            crate::synthetic::to_jsonl(want_eval).expect("test value")
        );
    }
}
