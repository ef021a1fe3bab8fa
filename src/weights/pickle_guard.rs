//! Bounds on a `torch.save` checkpoint before candle's pickle reader sees it.
//!
//! candle's reader (like any pickle VM) executes no code here, but it builds every value it is
//! told to: a memo entry fetched a million times is cloned a million times, a value nested two
//! million levels deep overflows the stack when it is cloned or dropped, and a string length is
//! allocated before it is read. A hostile 439-byte file can thus take all memory. This module
//! walks the pickle's opcodes once, without building anything, tracking for each stack entry how
//! many nodes and payload bytes it stands for and how deep it is nested, and refuses the file when
//! the totals exceed [`PickleLimits`]. It accepts exactly the opcodes candle's reader knows.

use std::collections::HashMap;

/// What a checkpoint's pickle may cost. The defaults are far above what `torch.save` writes for
/// a state dict (depth under 10, a few hundred thousand nodes even with optimizer states).
#[derive(Debug, Clone, Copy)]
pub struct PickleLimits {
    /// Size of the pickle stream itself.
    pub max_bytes: u64,
    /// Nesting depth of any value.
    pub max_depth: u32,
    /// Values created in total, clones from the memo included.
    pub max_nodes: u64,
    /// String payload bytes created in total, clones included.
    pub max_payload_bytes: u64,
    /// Entries in the memo.
    pub max_memo: usize,
    /// Entries on the stack at once.
    pub max_stack: usize,
}

impl Default for PickleLimits {
    fn default() -> Self {
        PickleLimits {
            max_bytes: 256 << 20,
            max_depth: 200,
            max_nodes: 20_000_000,
            max_payload_bytes: 1 << 30,
            max_memo: 4_000_000,
            max_stack: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Entry {
    Mark,
    Value { nodes: u64, bytes: u64, depth: u32 },
}

const LEAF: Entry = Entry::Value {
    nodes: 1,
    bytes: 0,
    depth: 1,
};

struct Walker<'a> {
    data: &'a [u8],
    pos: usize,
    limits: PickleLimits,
    stack: Vec<Entry>,
    memo: HashMap<u32, Entry>,
    nodes: u64,
    payload: u64,
}

type Check<T> = std::result::Result<T, String>;

impl<'a> Walker<'a> {
    fn take(&mut self, n: usize) -> Check<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("pickle ends inside an operand at byte {}", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Check<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Check<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Check<usize> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("pickle ends inside a GLOBAL name")?;
        self.pos += n + 1;
        Ok(n)
    }

    /// Accounts for a value that is about to exist (built or cloned).
    fn create(&mut self, e: Entry) -> Check<()> {
        if let Entry::Value {
            nodes,
            bytes,
            depth,
        } = e
        {
            self.nodes = self.nodes.saturating_add(nodes);
            self.payload = self.payload.saturating_add(bytes);
            if self.nodes > self.limits.max_nodes {
                return Err(format!(
                    "pickle builds more than {} values (a memo clone bomb?)",
                    self.limits.max_nodes
                ));
            }
            if self.payload > self.limits.max_payload_bytes {
                return Err(format!(
                    "pickle builds more than {} bytes of strings",
                    self.limits.max_payload_bytes
                ));
            }
            if depth > self.limits.max_depth {
                return Err(format!(
                    "pickle nests values deeper than {} levels",
                    self.limits.max_depth
                ));
            }
        }
        Ok(())
    }

    fn push(&mut self, e: Entry) -> Check<()> {
        if self.stack.len() >= self.limits.max_stack {
            return Err(format!(
                "pickle stack grows past {} entries",
                self.limits.max_stack
            ));
        }
        self.create(e)?;
        self.stack.push(e);
        Ok(())
    }

    fn pop(&mut self) -> Check<Entry> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle pops an empty stack".to_string())
    }

    fn pop_value(&mut self) -> Check<(u64, u64, u32)> {
        match self.pop()? {
            Entry::Value {
                nodes,
                bytes,
                depth,
            } => Ok((nodes, bytes, depth)),
            Entry::Mark => Err("pickle uses a MARK as a value".to_string()),
        }
    }

    fn pop_to_mark(&mut self) -> Check<(u64, u64, u32, usize)> {
        let mark = self
            .stack
            .iter()
            .rposition(|e| *e == Entry::Mark)
            .ok_or("pickle has no MARK to pop to")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(combine(&items))
    }

    /// A container built from `parts`: one more node, one level deeper.
    fn push_container(&mut self, (nodes, bytes, depth, _): (u64, u64, u32, usize)) -> Check<()> {
        self.push(Entry::Value {
            nodes: nodes.saturating_add(1),
            bytes,
            depth: depth + 1,
        })
    }

    /// Adds `parts` into the container on top of the stack (APPEND, SETITEM, BUILD...).
    fn extend_top(&mut self, (nodes, bytes, depth, _): (u64, u64, u32, usize)) -> Check<()> {
        let top = self
            .stack
            .last_mut()
            .ok_or("pickle extends an empty stack")?;
        match top {
            Entry::Value {
                nodes: n,
                bytes: b,
                depth: d,
            } => {
                *n = n.saturating_add(nodes);
                *b = b.saturating_add(bytes);
                *d = (*d).max(depth + 1);
                if *d > self.limits.max_depth {
                    return Err(format!(
                        "pickle nests values deeper than {} levels",
                        self.limits.max_depth
                    ));
                }
                Ok(())
            }
            Entry::Mark => Err("pickle extends a MARK".to_string()),
        }
    }

    fn memo_put(&mut self, id: u32) -> Check<()> {
        let top = *self.stack.last().ok_or("pickle memoizes an empty stack")?;
        if top == Entry::Mark {
            return Err("pickle memoizes a MARK".to_string());
        }
        // candle clones the value into the memo.
        self.create(top)?;
        if !self.memo.contains_key(&id) && self.memo.len() >= self.limits.max_memo {
            return Err(format!(
                "pickle memo grows past {} entries",
                self.limits.max_memo
            ));
        }
        self.memo.insert(id, top);
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> Check<()> {
        let e = *self
            .memo
            .get(&id)
            .ok_or_else(|| format!("pickle reads memo entry {id}, never stored"))?;
        self.push(e)
    }

    fn string(&mut self, len: usize) -> Check<()> {
        self.take(len)?;
        self.push(Entry::Value {
            nodes: 1,
            bytes: len as u64,
            depth: 1,
        })
    }

    fn run(&mut self) -> Check<()> {
        loop {
            let at = self.pos;
            let op = self
                .u8()
                .map_err(|_| "pickle ends without STOP".to_string())?;
            match op {
                0x80 => {
                    self.u8()?;
                }
                b'c' => {
                    let a = self.line()?;
                    let b = self.line()?;
                    self.push(Entry::Value {
                        nodes: 1,
                        bytes: (a + b) as u64,
                        depth: 1,
                    })?;
                }
                b'q' => {
                    let id = self.u8()? as u32;
                    self.memo_put(id)?;
                }
                b'r' => {
                    let id = self.u32()?;
                    self.memo_put(id)?;
                }
                b'h' => {
                    let id = self.u8()? as u32;
                    self.memo_get(id)?;
                }
                b'j' => {
                    let id = self.u32()?;
                    self.memo_get(id)?;
                }
                b')' | b']' | b'}' | b'd' | b'N' | 0x88 | 0x89 => self.push(LEAF)?,
                b'K' => {
                    self.take(1)?;
                    self.push(LEAF)?;
                }
                b'M' => {
                    self.take(2)?;
                    self.push(LEAF)?;
                }
                b'J' => {
                    self.take(4)?;
                    self.push(LEAF)?;
                }
                b'G' => {
                    self.take(8)?;
                    self.push(LEAF)?;
                }
                0x8a => {
                    let n = self.u8()?;
                    if n > 8 {
                        return Err(format!("pickle LONG1 of {n} bytes at byte {at}"));
                    }
                    self.take(n as usize)?;
                    self.push(LEAF)?;
                }
                b'X' => {
                    let len = self.u32()? as usize;
                    self.string(len)?;
                }
                b'(' => self.push(Entry::Mark)?,
                b't' => {
                    let parts = self.pop_to_mark()?;
                    self.push_container(parts)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut parts = Vec::with_capacity(n);
                    for _ in 0..n {
                        let (nodes, bytes, depth) = self.pop_value()?;
                        parts.push(Entry::Value {
                            nodes,
                            bytes,
                            depth,
                        });
                    }
                    self.push_container(combine(&parts))?;
                }
                b'Q' => {
                    let (nodes, bytes, depth) = self.pop_value()?;
                    self.push_container((nodes, bytes, depth, 1))?;
                }
                b'a' => {
                    let (nodes, bytes, depth) = self.pop_value()?;
                    self.extend_top((nodes, bytes, depth, 1))?;
                }
                b'e' | b'u' => {
                    let parts = self.pop_to_mark()?;
                    self.extend_top(parts)?;
                }
                b's' => {
                    let v = self.pop_value()?;
                    let k = self.pop_value()?;
                    let parts = [v, k].map(|(nodes, bytes, depth)| Entry::Value {
                        nodes,
                        bytes,
                        depth,
                    });
                    self.extend_top(combine(&parts))?;
                }
                b'b' => {
                    let (nodes, bytes, depth) = self.pop_value()?;
                    self.extend_top((nodes, bytes, depth, 1))?;
                }
                b'R' | 0x81 => {
                    let args = self.pop_value()?;
                    let callable = self.pop_value()?;
                    let parts = [args, callable].map(|(nodes, bytes, depth)| Entry::Value {
                        nodes,
                        bytes,
                        depth,
                    });
                    self.push_container(combine(&parts))?;
                }
                b'.' => return Ok(()),
                other => {
                    return Err(format!(
                    "pickle opcode 0x{other:02x} at byte {at} is not one a tensor checkpoint uses"
                ))
                }
            }
        }
    }
}

/// Nodes, bytes and depth of several values together, and how many there are.
fn combine(items: &[Entry]) -> (u64, u64, u32, usize) {
    items.iter().fold((0, 0, 0, 0), |(n, b, d, c), e| match e {
        Entry::Value {
            nodes,
            bytes,
            depth,
        } => (
            n.saturating_add(*nodes),
            b.saturating_add(*bytes),
            d.max(*depth),
            c + 1,
        ),
        Entry::Mark => (n, b, d, c),
    })
}

/// Checks one pickle stream against `limits`; the error says which bound it broke.
pub fn check_pickle(data: &[u8], limits: &PickleLimits) -> std::result::Result<(), String> {
    if data.len() as u64 > limits.max_bytes {
        return Err(format!(
            "pickle of {} bytes, more than the {} a checkpoint needs",
            data.len(),
            limits.max_bytes
        ));
    }
    Walker {
        data,
        pos: 0,
        limits: *limits,
        stack: Vec::new(),
        memo: HashMap::new(),
        nodes: 0,
        payload: 0,
    }
    .run()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(data: &[u8]) -> std::result::Result<(), String> {
        check_pickle(data, &PickleLimits::default())
    }

    /// `{"a": (1, 2)}` as protocol 2 writes it.
    const SMALL: &[u8] = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01K\x02\x86q\x02s.";

    #[test]
    fn a_plain_state_dict_pickle_passes() {
        check(SMALL).unwrap();
    }

    #[test]
    fn memo_clone_bombs_are_refused() {
        // x = []; then repeatedly x = [x, x] through the memo: 2^k nodes from 7 bytes a level.
        let mut p = b"\x80\x02]q\x00".to_vec();
        for _ in 0..64 {
            p.extend_from_slice(b"(h\x00h\x00lq\x00");
        }
        // `l` (LIST) is not an opcode candle reads; build it with `]` + APPENDS instead.
        let mut p2 = b"\x80\x02]q\x00".to_vec();
        for _ in 0..64 {
            p2.extend_from_slice(b"](h\x00h\x00eq\x00");
        }
        p2.push(b'.');
        let err = check(&p2).unwrap_err();
        assert!(err.contains("values"), "{err}");
        assert!(check(&p).is_err());
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut p = b"\x80\x02".to_vec();
        p.extend(std::iter::repeat_n(b']', 100_000));
        p.extend(std::iter::repeat_n(b'a', 99_999));
        p.push(b'.');
        let err = check(&p).unwrap_err();
        assert!(err.contains("deeper"), "{err}");
        // Tuples nest the same way.
        let mut p = b"\x80\x02N".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 100_000));
        p.push(b'.');
        assert!(check(&p).unwrap_err().contains("deeper"));
    }

    #[test]
    fn lying_lengths_and_unknown_opcodes_are_refused() {
        // A string claiming 4 GB.
        let err = check(b"\x80\x02X\xff\xff\xff\xff.").unwrap_err();
        assert!(err.contains("ends inside"), "{err}");
        // REDUCE of os.system: the opcodes pass (nothing is executed by the reader), but an
        // opcode outside the reader's set does not.
        assert!(check(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.").is_ok());
        assert!(check(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00N.")
            .unwrap_err()
            .contains("opcode"));
        assert!(check(b"\x80\x02N").unwrap_err().contains("STOP"));
        assert!(check(b"\x80\x02h\x05.").unwrap_err().contains("memo"));
        assert!(check(b"\x80\x02\x8a\x20.").unwrap_err().contains("LONG1"));
    }

    #[test]
    fn memo_and_stack_sizes_are_bounded() {
        let limits = PickleLimits {
            max_memo: 10,
            max_stack: 10,
            ..PickleLimits::default()
        };
        let mut p = b"\x80\x02N".to_vec();
        for i in 0..20u32 {
            p.push(b'r');
            p.extend_from_slice(&i.to_le_bytes());
        }
        p.push(b'.');
        assert!(check_pickle(&p, &limits).unwrap_err().contains("memo"));
        let mut p = b"\x80\x02".to_vec();
        p.extend(std::iter::repeat_n(b'N', 20));
        p.push(b'.');
        assert!(check_pickle(&p, &limits).unwrap_err().contains("stack"));
    }
}
