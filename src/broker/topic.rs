//! The topic-exchange binding index: a trie over the dot-separated words of
//! binding keys.
//!
//! A binding key is a pattern: `*` stands for exactly one word and `#` for
//! zero or more words. Matching walks the trie once per publish instead of
//! testing every binding, and it remembers which (trie node, word position)
//! states it has already visited, so keys such as `#.#.#` cost at most
//! `nodes × (words + 1)` steps instead of an exponential number of paths.
//!
//! Words are split as RabbitMQ splits them: the empty key has no words at all
//! (so `#` matches it and `*` does not), and any other key has one word more
//! than it has dots, empty words included (`"a..b"` is `a`, ``, `b`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// The root node's index; it is never freed.
const ROOT: usize = 0;

/// Splits a routing or binding key into words the way RabbitMQ does.
pub fn split_words(key: &str) -> impl Iterator<Item = &str> {
    // `"".split('.')` would yield one empty word; RabbitMQ yields none.
    (!key.is_empty())
        .then(|| key.split('.'))
        .into_iter()
        .flatten()
}

#[derive(Clone, Debug)]
struct Node<D> {
    /// Child per next word of a binding key (`*` and `#` included, literally).
    children: HashMap<Box<str>, usize>,
    /// Bindings that end here, with how many times each was inserted: two
    /// bindings that differ only in their arguments share a key and a
    /// destination, and removing one must not remove the other.
    destinations: BTreeMap<D, usize>,
    /// This node was reached through a `#` word, so it may absorb more words.
    is_hash: bool,
}

impl<D> Node<D> {
    fn new(is_hash: bool) -> Self {
        Node {
            children: HashMap::new(),
            destinations: BTreeMap::new(),
            is_hash,
        }
    }
}

/// A multiset of (binding key, destination) pairs, matched by routing key.
///
/// Nodes live in one vector and refer to each other by index; removed nodes
/// go on a free list so a long-lived exchange with binding churn does not grow.
#[derive(Clone, Debug)]
pub struct TopicTrie<D> {
    nodes: Vec<Node<D>>,
    free: Vec<usize>,
    /// Number of (key, destination) insertions currently held.
    len: usize,
    /// Live nodes reached through `#`. Without any, every matching state is
    /// reached by one path only, so matching skips the visited set.
    hash_nodes: usize,
}

impl<D: Ord + Clone> Default for TopicTrie<D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: Ord + Clone> TopicTrie<D> {
    pub fn new() -> Self {
        TopicTrie {
            nodes: vec![Node::new(false)],
            free: Vec::new(),
            len: 0,
            hash_nodes: 0,
        }
    }

    /// Number of insertions held (a pair inserted twice counts twice).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds one binding of `binding_key` to `dest`. Returns true when the pair
    /// was not held before.
    pub fn insert(&mut self, binding_key: &str, dest: D) -> bool {
        let mut node = ROOT;
        for word in split_words(binding_key) {
            node = match self.nodes[node].children.get(word) {
                Some(&child) => child,
                None => {
                    let child = self.alloc(word == "#");
                    self.nodes[node].children.insert(word.into(), child);
                    child
                }
            };
        }
        let count = self.nodes[node].destinations.entry(dest).or_insert(0);
        *count += 1;
        self.len += 1;
        *count == 1
    }

    /// Removes one binding of `binding_key` to `dest`. Returns false when the
    /// pair was not held. Nodes left without bindings or children are freed.
    pub fn remove(&mut self, binding_key: &str, dest: &D) -> bool {
        // The path from the root, as (parent, word leading to child).
        let mut path: Vec<(usize, &str)> = Vec::new();
        let mut node = ROOT;
        for word in split_words(binding_key) {
            match self.nodes[node].children.get(word) {
                Some(&child) => {
                    path.push((node, word));
                    node = child;
                }
                None => return false,
            }
        }
        let destinations = &mut self.nodes[node].destinations;
        match destinations.get_mut(dest) {
            None => return false,
            Some(count) if *count > 1 => *count -= 1,
            Some(_) => {
                destinations.remove(dest);
            }
        }
        self.len -= 1;
        // Prune from the leaf upwards while nodes have become empty.
        while let Some((parent, word)) = path.pop() {
            let n = &self.nodes[node];
            if !n.children.is_empty() || !n.destinations.is_empty() {
                break;
            }
            self.nodes[parent].children.remove(word);
            if self.nodes[node].is_hash {
                self.hash_nodes -= 1;
            }
            self.nodes[node] = Node::new(false);
            self.free.push(node);
            node = parent;
        }
        true
    }

    /// Calls `f` for every destination whose binding key matches
    /// `routing_key`. A destination bound with several matching keys may be
    /// reported more than once; callers deduplicate.
    pub fn for_each_match<'a>(&'a self, routing_key: &str, mut f: impl FnMut(&'a D)) {
        let words: Vec<&str> = split_words(routing_key).collect();
        let n = words.len();
        // Each (node, words consumed) state is expanded at most once; only
        // `#` can lead to a state twice.
        let mut seen: HashSet<(usize, usize)> = HashSet::new();
        let mut stack: Vec<(usize, usize)> = vec![(ROOT, 0)];
        while let Some((id, i)) = stack.pop() {
            if self.hash_nodes > 0 && !seen.insert((id, i)) {
                continue;
            }
            let Some(node) = self.nodes.get(id) else {
                continue;
            };
            debug_assert!(i <= n);
            if node.is_hash && i < n {
                // `#` swallows one more word and stays where it is.
                stack.push((id, i + 1));
            }
            if i == n {
                node.destinations.keys().for_each(&mut f);
            }
            if let Some(&hash) = node.children.get("#") {
                // `#` matching zero words.
                stack.push((hash, i));
            }
            if let Some(&word) = words.get(i) {
                if let Some(&child) = node.children.get(word) {
                    stack.push((child, i + 1));
                }
                if word != "*" {
                    if let Some(&star) = node.children.get("*") {
                        stack.push((star, i + 1));
                    }
                }
            }
        }
    }

    /// The set of destinations matching `routing_key`.
    pub fn matches(&self, routing_key: &str) -> BTreeSet<D> {
        let mut out = BTreeSet::new();
        self.for_each_match(routing_key, |d| {
            out.insert(d.clone());
        });
        out
    }

    fn alloc(&mut self, is_hash: bool) -> usize {
        if is_hash {
            self.hash_nodes += 1;
        }
        match self.free.pop() {
            Some(id) => {
                self.nodes[id] = Node::new(is_hash);
                id
            }
            None => {
                self.nodes.push(Node::new(is_hash));
                self.nodes.len() - 1
            }
        }
    }

    /// Nodes in use, root included (for tests of pruning).
    #[cfg(test)]
    fn live_nodes(&self) -> usize {
        self.nodes.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn trie(bindings: &[(&str, &str)]) -> TopicTrie<String> {
        let mut t = TopicTrie::new();
        for (k, d) in bindings {
            t.insert(k, d.to_string());
        }
        t
    }

    fn hits(t: &TopicTrie<String>, key: &str) -> Vec<String> {
        t.matches(key).into_iter().collect()
    }

    #[test]
    fn split_follows_rabbitmq() {
        assert_eq!(split_words("").count(), 0);
        assert_eq!(split_words("a").collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(split_words("a..b").collect::<Vec<_>>(), vec!["a", "", "b"]);
        assert_eq!(split_words(".").collect::<Vec<_>>(), vec!["", ""]);
        assert_eq!(split_words("a.").collect::<Vec<_>>(), vec!["a", ""]);
    }

    #[test]
    fn literal_keys_match_exactly() {
        let t = trie(&[("a.b", "q1"), ("a", "q2")]);
        assert_eq!(hits(&t, "a.b"), vec!["q1"]);
        assert_eq!(hits(&t, "a"), vec!["q2"]);
        assert!(hits(&t, "a.b.c").is_empty());
        assert!(hits(&t, "b").is_empty());
    }

    #[test]
    fn star_matches_exactly_one_word() {
        let t = trie(&[("a.*", "q"), ("*", "one")]);
        assert_eq!(hits(&t, "a.b"), vec!["q"]);
        assert_eq!(hits(&t, "a."), vec!["q"]);
        assert_eq!(hits(&t, "a"), vec!["one"]);
        assert!(hits(&t, "a.b.c").is_empty());
        // The empty key has no words, so `*` cannot match it.
        assert!(hits(&t, "").is_empty());
    }

    #[test]
    fn hash_at_start_matches_zero_or_more_leading_words() {
        let t = trie(&[("#.z", "q")]);
        assert_eq!(hits(&t, "z"), vec!["q"]);
        assert_eq!(hits(&t, "a.z"), vec!["q"]);
        assert_eq!(hits(&t, "a.b.c.z"), vec!["q"]);
        assert!(hits(&t, "z.a").is_empty());
    }

    #[test]
    fn hash_in_middle_matches_zero_or_more_words() {
        let t = trie(&[("a.#.z", "q")]);
        assert_eq!(hits(&t, "a.z"), vec!["q"]);
        assert_eq!(hits(&t, "a.b.z"), vec!["q"]);
        assert_eq!(hits(&t, "a.b.c.z"), vec!["q"]);
        assert!(hits(&t, "a.b").is_empty());
        assert!(hits(&t, "z").is_empty());
    }

    #[test]
    fn hash_at_end_matches_zero_or_more_trailing_words() {
        let t = trie(&[("a.#", "q")]);
        assert_eq!(hits(&t, "a"), vec!["q"]);
        assert_eq!(hits(&t, "a.b"), vec!["q"]);
        assert_eq!(hits(&t, "a.b.c"), vec!["q"]);
        assert!(hits(&t, "b.a").is_empty());
    }

    #[test]
    fn lone_hash_matches_everything_including_the_empty_key() {
        let t = trie(&[("#", "q")]);
        for key in ["", "a", "a.b", "..", "a..b"] {
            assert_eq!(hits(&t, key), vec!["q"], "key {key:?}");
        }
    }

    #[test]
    fn empty_words_are_words() {
        let t = trie(&[("a..b", "q1"), ("", "q2"), ("a.*.b", "q3")]);
        assert_eq!(hits(&t, "a..b"), vec!["q1", "q3"]);
        assert_eq!(hits(&t, ""), vec!["q2"]);
        assert_eq!(hits(&t, "a.x.b"), vec!["q3"]);
    }

    #[test]
    fn same_binding_twice_needs_two_removals() {
        let mut t = trie(&[("a.*", "q"), ("a.*", "q")]);
        assert!(t.remove("a.*", &"q".to_string()));
        assert_eq!(hits(&t, "a.b"), vec!["q"]);
        assert!(t.remove("a.*", &"q".to_string()));
        assert!(hits(&t, "a.b").is_empty());
        assert!(!t.remove("a.*", &"q".to_string()));
    }

    #[test]
    fn removing_prunes_nodes_and_reuses_them() {
        let mut t = trie(&[("a.b.c", "q"), ("a.x", "r")]);
        assert_eq!(t.live_nodes(), 5);
        assert!(t.remove("a.b.c", &"q".to_string()));
        assert_eq!(t.live_nodes(), 3);
        assert_eq!(hits(&t, "a.x"), vec!["r"]);
        t.insert("a.b.c", "q".to_string());
        assert_eq!(t.nodes.len(), 5, "freed nodes are reused");
        assert!(!t.remove("a.nope", &"q".to_string()));
        assert_eq!(t.len(), 2);
        t.insert("a.#.b.#", "h".to_string());
        assert_eq!(t.hash_nodes, 2);
        assert!(t.remove("a.#.b.#", &"h".to_string()));
        assert_eq!(t.hash_nodes, 0);
    }

    #[test]
    fn many_hashes_do_not_blow_up() {
        let pattern = vec!["#"; 30].join(".");
        let t = trie(&[(&pattern, "q"), ("#.a.#.b.#.c.#", "r")]);
        let key = vec!["a"; 200].join(".");
        assert_eq!(hits(&t, &key), vec!["q"]);
        let key = vec!["a.b.c"; 50].join(".");
        assert_eq!(hits(&t, &key), vec!["q", "r"]);
    }

    /// Straightforward recursive matcher used as the reference.
    fn reference(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|k| reference(rest, &key[k..])),
            Some((&"*", rest)) => !key.is_empty() && reference(rest, &key[1..]),
            Some((w, rest)) => key.first() == Some(w) && reference(rest, &key[1..]),
        }
    }

    fn key_strategy(alphabet: &'static [&'static str]) -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(alphabet), 0..6).prop_map(|w| w.join("."))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn trie_agrees_with_reference_matcher(
            patterns in prop::collection::vec(key_strategy(&["a", "b", "", "*", "#"]), 1..8),
            keys in prop::collection::vec(key_strategy(&["a", "b", ""]), 1..8),
            removed in prop::collection::vec(any::<bool>(), 8),
        ) {
            let mut t = TopicTrie::new();
            for (i, p) in patterns.iter().enumerate() {
                t.insert(p, i);
            }
            for (i, p) in patterns.iter().enumerate() {
                if removed[i] {
                    prop_assert!(t.remove(p, &i));
                }
            }
            for key in &keys {
                let kw: Vec<&str> = split_words(key).collect();
                let expected: BTreeSet<usize> = patterns
                    .iter()
                    .enumerate()
                    .filter(|(i, p)| {
                        !removed[*i] && reference(&split_words(p).collect::<Vec<_>>(), &kw)
                    })
                    .map(|(i, _)| i)
                    .collect();
                prop_assert_eq!(t.matches(key), expected, "key {:?}", key);
            }
            let live_hash = t.nodes.iter().enumerate()
                .filter(|(i, n)| n.is_hash && !t.free.contains(i))
                .count();
            prop_assert_eq!(t.hash_nodes, live_hash);
        }
    }
}
