//! Finds where a key path (`load.conversations.members`, `faults[2].node`) sits in the YAML
//! text, so problems found after deserialisation can point at the offending key.
//!
//! serde_yaml keeps no positions once a value is deserialised, so this module builds its own
//! outline of the document: mappings (with the position of each key), sequences (with the
//! position of each item) and scalars. It understands the YAML that scenarios are written
//! in — block and flow collections, plain and quoted scalars, comments, block scalars,
//! anchors and tags — and is only ever used on text that serde_yaml has already accepted.
//! When a path cannot be followed to the end (a key left at its default, an exotic
//! construct), the position of the deepest part that was found is used instead.

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

const DOCUMENT_START: Position = Position { line: 1, column: 1 };

#[derive(Debug)]
struct Node {
    position: Position,
    shape: Shape,
}

#[derive(Debug)]
enum Shape {
    Mapping(Vec<Entry>),
    Sequence(Vec<Node>),
    Scalar,
}

#[derive(Debug)]
struct Entry {
    key: String,
    key_position: Position,
    value: Node,
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// Splits `faults[2].toxic.latency_ms` into `faults`, `[2]`, `toxic`, `latency_ms`.
pub fn split_path(path: &str) -> Vec<Segment> {
    let mut segments = Vec::new();
    for part in path.split('.').filter(|part| !part.is_empty()) {
        let (key, mut indices) = match part.find('[') {
            Some(bracket) => (&part[..bracket], &part[bracket..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            segments.push(Segment::Key(key.to_string()));
        }
        while let Some(close) = indices.find(']') {
            if let Ok(index) = indices[1..close].parse() {
                segments.push(Segment::Index(index));
            }
            indices = &indices[close + 1..];
        }
    }
    segments
}

/// The outline of one YAML document.
#[derive(Debug)]
pub struct Outline {
    root: Option<Node>,
}

impl Outline {
    pub fn parse(text: &str) -> Outline {
        let mut scanner = Scanner::new(text);
        Outline {
            root: scanner.document(),
        }
    }

    /// The position of the key (or list item) at `path`, or of its deepest ancestor found.
    pub fn locate(&self, path: &str) -> Position {
        self.follow(path).0
    }

    /// Like [`Outline::locate`], but `None` unless the whole path was found.
    pub fn locate_exactly(&self, path: &str) -> Option<Position> {
        match self.follow(path) {
            (position, true) => Some(position),
            (_, false) => None,
        }
    }

    /// Like [`Outline::locate`], but `None` when not even the first key of the path was
    /// found (the position would only be the document's start).
    pub fn locate_within(&self, path: &str) -> Option<Position> {
        let first_segment = split_path(path)
            .into_iter()
            .take(1)
            .map(|segment| match segment {
                Segment::Key(key) => key,
                Segment::Index(index) => format!("[{index}]"),
            });
        let first = first_segment.collect::<String>();
        self.locate_exactly(&first).map(|_| self.locate(path))
    }

    fn follow(&self, path: &str) -> (Position, bool) {
        let Some(mut node) = self.root.as_ref() else {
            return (DOCUMENT_START, false);
        };
        let mut position = node.position;
        for segment in split_path(path) {
            let next = match (&node.shape, &segment) {
                (Shape::Mapping(entries), Segment::Key(key)) => entries
                    .iter()
                    .find(|entry| entry.key == *key)
                    .map(|entry| (entry.key_position, &entry.value)),
                (Shape::Sequence(items), Segment::Index(index)) => {
                    items.get(*index).map(|item| (item.position, item))
                }
                _ => None,
            };
            match next {
                Some((found_at, child)) => {
                    position = found_at;
                    node = child;
                }
                None => return (position, false),
            }
        }
        (position, true)
    }
}

/// A cursor over the characters of the text. Every block-level parser leaves it at the
/// first character of the next line that has content (or at the end), which is what lets
/// the enclosing collection decide by that line's indentation whether it continues.
struct Scanner {
    chars: Vec<char>,
    at: usize,
    line_starts: Vec<usize>,
}

impl Scanner {
    fn new(text: &str) -> Scanner {
        let chars: Vec<char> = text
            .strip_prefix('\u{feff}')
            .unwrap_or(text)
            .chars()
            .collect();
        let mut line_starts = vec![0];
        line_starts.extend(
            chars
                .iter()
                .enumerate()
                .filter(|(_, c)| **c == '\n')
                .map(|(index, _)| index + 1),
        );
        Scanner {
            chars,
            at: 0,
            line_starts,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn peek_ahead(&self, offset: usize) -> Option<char> {
        self.chars.get(self.at + offset).copied()
    }

    fn at_end(&self) -> bool {
        self.at >= self.chars.len()
    }

    fn position_of(&self, index: usize) -> Position {
        let line_index = self
            .line_starts
            .partition_point(|start| *start <= index)
            .saturating_sub(1);
        let line_start = self.line_starts.get(line_index).copied().unwrap_or(0);
        Position {
            line: line_index + 1,
            column: index - line_start + 1,
        }
    }

    fn position(&self) -> Position {
        self.position_of(self.at)
    }

    /// 0-based column of the cursor: the indentation when it sits on a line's first content.
    fn column(&self) -> usize {
        self.position().column - 1
    }

    fn skip_inline_space(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t' | '\r')) {
            self.at += 1;
        }
    }

    /// True at the end of the line's content: a line break, the end, or a comment.
    fn at_line_end(&self) -> bool {
        match self.peek() {
            None | Some('\n') => true,
            Some('#') => {
                self.at == 0 || matches!(self.chars.get(self.at - 1), Some(' ' | '\t' | '\n'))
            }
            _ => false,
        }
    }

    /// Skips the rest of this line and any blank or comment-only lines after it.
    fn finish_line(&mut self) {
        loop {
            while !matches!(self.peek(), None | Some('\n')) {
                self.at += 1;
            }
            if self.at_end() {
                return;
            }
            self.at += 1;
            self.skip_inline_space();
            if !self.at_line_end() {
                return;
            }
        }
    }

    /// A `-` that starts a block sequence item.
    fn at_sequence_dash(&self) -> bool {
        self.peek() == Some('-')
            && matches!(self.peek_ahead(1), None | Some(' ' | '\t' | '\n' | '\r'))
    }

    fn document(&mut self) -> Option<Node> {
        self.skip_inline_space();
        if self.at_line_end() {
            self.finish_line();
        }
        // Directives (`%YAML`) and the document start marker come before the root node.
        while self.peek() == Some('%') {
            self.finish_line();
        }
        if self.at_end() {
            return None;
        }
        if self.column() == 0
            && self.looking_at("---")
            && matches!(self.peek_ahead(3), None | Some(' ' | '\t' | '\n' | '\r'))
        {
            let marker = self.position();
            self.at += 3;
            return Some(self.value_after_indicator(-1, true, marker));
        }
        Some(self.node_here(-1))
    }

    fn looking_at(&self, text: &str) -> bool {
        text.chars()
            .enumerate()
            .all(|(offset, c)| self.peek_ahead(offset) == Some(c))
    }

    /// The value after `key:` or `- ` (or `---`): on the same line, or on the following
    /// lines when they are indented deeper than `parent_indent` (a block sequence may also
    /// sit at the parent's own indentation under a mapping key).
    fn value_after_indicator(
        &mut self,
        parent_indent: isize,
        sequence_may_share_indent: bool,
        fallback: Position,
    ) -> Node {
        self.skip_inline_space();
        self.skip_properties();
        if !self.at_line_end() {
            return self.node_here(parent_indent);
        }
        self.finish_line();
        if self.at_end() {
            return scalar_at(fallback);
        }
        let indent = column_as_indent(self.column());
        let deeper = indent > parent_indent;
        let sequence_at_same_indent =
            sequence_may_share_indent && indent == parent_indent && self.at_sequence_dash();
        if deeper || sequence_at_same_indent {
            self.skip_properties();
            self.node_here(parent_indent)
        } else {
            // An empty value (null); the cursor already rests on the next sibling's line.
            scalar_at(fallback)
        }
    }

    /// Anchors (`&name`) and tags (`!tag`) carry no position of interest.
    fn skip_properties(&mut self) {
        while matches!(self.peek(), Some('&' | '!')) {
            while !matches!(self.peek(), None | Some(' ' | '\t' | '\n' | '\r')) {
                self.at += 1;
            }
            self.skip_inline_space();
        }
    }

    /// A node that starts at the cursor (which is on content).
    fn node_here(&mut self, parent_indent: isize) -> Node {
        let start = self.at;
        let position = self.position();
        match self.peek() {
            Some('{' | '[') => {
                let node = self.flow_node();
                self.finish_line();
                node
            }
            Some('|' | '>') => {
                // A block scalar: its lines are those indented deeper than the parent.
                self.finish_line();
                while !self.at_end() && column_as_indent(self.column()) > parent_indent {
                    self.finish_line();
                }
                scalar_at(position)
            }
            _ if self.at_sequence_dash() => self.block_sequence(),
            _ => {
                self.block_scalar_text();
                self.skip_inline_space();
                if self.at_mapping_colon() {
                    self.at = start;
                    self.block_mapping()
                } else {
                    self.finish_line();
                    scalar_at(position)
                }
            }
        }
    }

    /// A `:` that ends a key: followed by a space, a line break or the end.
    fn at_mapping_colon(&self) -> bool {
        self.peek() == Some(':')
            && matches!(self.peek_ahead(1), None | Some(' ' | '\t' | '\n' | '\r'))
    }

    fn block_mapping(&mut self) -> Node {
        let indent = self.column();
        let position = self.position();
        let mut entries = Vec::new();
        loop {
            let before = self.at;
            let key_position = self.position();
            let key = self.block_scalar_text();
            self.skip_inline_space();
            if self.at_mapping_colon() {
                self.at += 1;
                let value =
                    self.value_after_indicator(column_as_indent(indent), true, key_position);
                entries.push(Entry {
                    key,
                    key_position,
                    value,
                });
            } else {
                self.finish_line();
            }
            if !self.continue_collection(indent, false) || self.at == before {
                break;
            }
        }
        Node {
            position,
            shape: Shape::Mapping(entries),
        }
    }

    fn block_sequence(&mut self) -> Node {
        let indent = self.column();
        let position = self.position();
        let mut items = Vec::new();
        loop {
            let before = self.at;
            let dash = self.position();
            self.at += 1;
            items.push(self.value_after_indicator(column_as_indent(indent), false, dash));
            if !self.continue_collection(indent, true) || self.at == before {
                break;
            }
        }
        Node {
            position,
            shape: Shape::Sequence(items),
        }
    }

    /// Moves over lines indented deeper than `indent` (continuations of a multi-line plain
    /// scalar) and tells whether the next line continues the collection at `indent`.
    fn continue_collection(&mut self, indent: usize, is_sequence: bool) -> bool {
        loop {
            if self.at_end() {
                return false;
            }
            let column = self.column();
            if column > indent {
                self.finish_line();
                continue;
            }
            return column == indent && self.at_sequence_dash() == is_sequence;
        }
    }

    /// A plain or quoted scalar in block context; returns its text (quotes removed).
    fn block_scalar_text(&mut self) -> String {
        match self.peek() {
            Some(quote @ ('"' | '\'')) => self.quoted_text(quote),
            _ => {
                let start = self.at;
                while !self.at_line_end() && !self.at_mapping_colon() {
                    if matches!(self.peek(), Some(' ' | '\t')) && self.peek_ahead(1) == Some('#') {
                        break;
                    }
                    self.at += 1;
                }
                self.chars[start..self.at]
                    .iter()
                    .collect::<String>()
                    .trim()
                    .to_string()
            }
        }
    }

    /// A quoted scalar, which may span lines; `''` escapes a single quote, `\` escapes in
    /// double quotes (only the quote itself matters for finding the end).
    fn quoted_text(&mut self, quote: char) -> String {
        self.at += 1;
        let mut text = String::new();
        while let Some(c) = self.peek() {
            self.at += 1;
            if c == quote {
                if quote == '\'' && self.peek() == Some('\'') {
                    self.at += 1;
                    text.push('\'');
                    continue;
                }
                break;
            }
            if c == '\\' && quote == '"' {
                if let Some(escaped) = self.peek() {
                    self.at += 1;
                    text.push(escaped);
                }
                continue;
            }
            text.push(c);
        }
        text
    }

    fn skip_flow_space(&mut self) {
        loop {
            match self.peek() {
                Some(' ' | '\t' | '\r' | '\n') => self.at += 1,
                Some('#') => {
                    while !matches!(self.peek(), None | Some('\n')) {
                        self.at += 1;
                    }
                }
                _ => return,
            }
        }
    }

    fn flow_node(&mut self) -> Node {
        self.skip_flow_space();
        self.skip_properties();
        let position = self.position();
        match self.peek() {
            Some('{') => self.flow_mapping(),
            Some('[') => self.flow_sequence(),
            _ => {
                self.flow_scalar_text();
                scalar_at(position)
            }
        }
    }

    fn flow_scalar_text(&mut self) -> String {
        match self.peek() {
            Some(quote @ ('"' | '\'')) => self.quoted_text(quote),
            _ => {
                let start = self.at;
                while let Some(c) = self.peek() {
                    let ends_key = c == ':'
                        && matches!(
                            self.peek_ahead(1),
                            None | Some(' ' | '\t' | '\n' | '\r' | ',' | '}' | ']')
                        );
                    if matches!(c, ',' | '{' | '}' | '[' | ']' | '\n') || ends_key {
                        break;
                    }
                    if matches!(c, ' ' | '\t') && self.peek_ahead(1) == Some('#') {
                        break;
                    }
                    self.at += 1;
                }
                self.chars[start..self.at]
                    .iter()
                    .collect::<String>()
                    .trim()
                    .to_string()
            }
        }
    }

    fn flow_mapping(&mut self) -> Node {
        let position = self.position();
        self.at += 1;
        let mut entries = Vec::new();
        loop {
            self.skip_flow_space();
            match self.peek() {
                None => break,
                Some('}') => {
                    self.at += 1;
                    break;
                }
                _ => {}
            }
            let before = self.at;
            let key_position = self.position();
            let key = self.flow_scalar_text();
            self.skip_flow_space();
            let value = if self.peek() == Some(':') {
                self.at += 1;
                self.flow_node()
            } else {
                scalar_at(key_position)
            };
            entries.push(Entry {
                key,
                key_position,
                value,
            });
            self.skip_flow_space();
            // Past the separator; also never loop without progress on text this outline
            // does not understand.
            if self.peek() == Some(',') || self.at == before {
                self.at += 1;
            }
        }
        Node {
            position,
            shape: Shape::Mapping(entries),
        }
    }

    fn flow_sequence(&mut self) -> Node {
        let position = self.position();
        self.at += 1;
        let mut items = Vec::new();
        loop {
            self.skip_flow_space();
            match self.peek() {
                None => break,
                Some(']') => {
                    self.at += 1;
                    break;
                }
                _ => {}
            }
            let before = self.at;
            items.push(self.flow_node());
            self.skip_flow_space();
            if self.peek() == Some(':') {
                // A single-pair mapping inside a sequence (`[a: 1]`): keep the item, skip the value.
                self.at += 1;
                self.flow_node();
                self.skip_flow_space();
            }
            if self.peek() == Some(',') || self.at == before {
                self.at += 1;
            }
        }
        Node {
            position,
            shape: Shape::Sequence(items),
        }
    }
}

fn scalar_at(position: Position) -> Node {
    Node {
        position,
        shape: Shape::Scalar,
    }
}

fn column_as_indent(column: usize) -> isize {
    isize::try_from(column).unwrap_or(isize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(line: usize, column: usize) -> Position {
        Position { line, column }
    }

    const TEXT: &str = "\
# a comment
name: demo   # trailing comment
load:
  users: 10
  rate:
    - { hold: 30s, rate: 5 }
    - ramp: 1m
      from: 5
      to: 10
  conversations:
    members: {uniform: {min: 1,
                        max: 4}}
faults:
- at: 1s
  kind: kill_node
  node: 2
-   at: 2s
    kind: toxic
    toxic:
      type: latency
description: |
  free text: with a colon
  - and a dash
\"quoted key\": 1
checks:
  - 'p99(delivery) < 100ms'
  - checker: order
";

    #[test]
    fn finds_keys_in_block_and_flow_collections() {
        let outline = Outline::parse(TEXT);
        assert_eq!(outline.locate("name"), at(2, 1));
        assert_eq!(outline.locate("load.users"), at(4, 3));
        assert_eq!(outline.locate("load.rate[0]"), at(6, 7));
        assert_eq!(outline.locate("load.rate[0].rate"), at(6, 20));
        assert_eq!(outline.locate("load.rate[1].ramp"), at(7, 7));
        assert_eq!(outline.locate("load.rate[1].to"), at(9, 7));
        assert_eq!(
            outline.locate("load.conversations.members.uniform.max"),
            at(12, 25)
        );
        assert_eq!(outline.locate("faults[0].node"), at(16, 3));
        assert_eq!(outline.locate("faults[1]"), at(17, 5));
        assert_eq!(outline.locate("faults[1].toxic.type"), at(20, 7));
        assert_eq!(outline.locate("description"), at(21, 1));
        assert_eq!(outline.locate("quoted key"), at(24, 1));
        assert_eq!(outline.locate("checks[0]"), at(26, 5));
        assert_eq!(outline.locate("checks[1].checker"), at(27, 5));
    }

    #[test]
    fn falls_back_to_the_deepest_ancestor_found() {
        let outline = Outline::parse(TEXT);
        assert_eq!(outline.locate("load.duration"), at(3, 1));
        assert_eq!(outline.locate("faults[0].duration"), at(14, 3));
        assert_eq!(outline.locate("faults[9].node"), at(13, 1));
        assert_eq!(outline.locate_exactly("faults[0].duration"), None);
        assert_eq!(outline.locate_exactly("faults[0].kind"), Some(at(15, 3)));
    }

    #[test]
    fn handles_the_document_marker_and_empty_text() {
        let outline = Outline::parse("---\nseed: 3\nload:\n  users: 1\n");
        assert_eq!(outline.locate("load.users"), at(4, 3));
        assert_eq!(Outline::parse("").locate("load"), at(1, 1));
    }

    #[test]
    fn handles_crlf_line_ends_anchors_and_multibyte_text() {
        let outline = Outline::parse(
            "description: \"héllo – wörld\"\r\nload: &base\r\n  users: 5\r\n  rate: *x\r\n",
        );
        assert_eq!(outline.locate("load.users"), at(3, 3));
        assert_eq!(outline.locate("load.rate"), at(4, 3));
        let outline = Outline::parse("a: { b: \"x, y: z\", c: 1 }\n");
        assert_eq!(outline.locate("a.c"), at(1, 20));
    }

    #[test]
    fn splits_paths_with_indices() {
        assert_eq!(
            split_path("faults[2].toxic.rate"),
            vec![
                Segment::Key("faults".into()),
                Segment::Index(2),
                Segment::Key("toxic".into()),
                Segment::Key("rate".into())
            ]
        );
    }
}
