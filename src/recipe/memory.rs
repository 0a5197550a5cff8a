//! A training run's memory floor, checked before its models load.
//!
//! The student's weights, gradients and AdamW moments and the teacher's weights are known from
//! the checkpoints' headers. When they alone exceed the memory the system has available, the
//! run cannot get far: the kernel would kill it, without a message, minutes into loading a
//! large teacher. So the run says so first, with the one setting that shrinks the floor. It
//! warns rather than refuses, because swap or memory freed meanwhile can still carry it.

use std::path::Path;

use candle_core::DType;

/// What a run's models hold at least, before any activation.
#[derive(Clone, Copy, Debug)]
pub struct Footprint {
    /// The student's parameters.
    pub student_params: usize,
    /// The precision the student is loaded and trained in.
    pub student_dtype: DType,
    /// The teacher's parameters and the precision its matrices are loaded in, if the method has one.
    pub teacher: Option<(usize, DType)>,
}

impl Footprint {
    /// The student's bytes: weights and gradients in its precision, AdamW's two moments in f32.
    pub fn student_bytes(&self) -> u64 {
        self.student_params as u64 * (2 * self.student_dtype.size_in_bytes() as u64 + 8)
    }

    /// The teacher's weights in bytes (0 without a teacher).
    pub fn teacher_bytes(&self) -> u64 {
        self.teacher.map_or(0, |(n, dtype)| n as u64 * dtype.size_in_bytes() as u64)
    }

    /// The floor: the student's and the teacher's bytes.
    pub fn floor(&self) -> u64 {
        self.student_bytes() + self.teacher_bytes()
    }

    /// A warning when the floor exceeds `available` bytes.
    pub fn warning(&self, available: u64) -> Option<String> {
        if self.floor() <= available {
            return None;
        }
        let gb = |b: u64| b as f64 / 1e9;
        let millions = |n: usize| n as f64 / 1e6;
        let mut text = format!(
            "warning: the models alone need at least {:.1} GB, more than the {:.1} GB of memory available, so the \
             system will likely stop the run: the student's weights, gradients and AdamW moments take {:.1} GB \
             ({:.1} M parameters in {})",
            gb(self.floor()),
            gb(available),
            gb(self.student_bytes()),
            millions(self.student_params),
            self.student_dtype.as_str()
        );
        if let Some((n, dtype)) = self.teacher {
            text += &format!(
                ", the teacher's weights {:.1} GB ({:.1} M parameters in {})",
                gb(self.teacher_bytes()),
                millions(n),
                dtype.as_str()
            );
            if dtype.size_in_bytes() > 2 {
                text += &format!("; --teacher-dtype bf16 would hold the teacher in {:.1} GB", gb(n as u64 * 2));
            }
        }
        Some(text)
    }
}

/// The memory this process can still take, in bytes (Linux), if readable: `MemAvailable` of
/// /proc/meminfo, or less where the process's control group has a memory limit (a container:
/// its /proc/meminfo shows the host's memory, the limit is what the kernel enforces).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let headroom = cgroup_headroom(Path::new("/sys/fs/cgroup"), &own);
    Some(headroom.map_or(kb * 1024, |h| h.min(kb * 1024)))
}

/// The room left under the memory limits of the control group named in `own` (the text of
/// /proc/self/cgroup) and its ancestors, with the control-group file systems mounted at `root`:
/// for each group with a limit, the limit less the group's usage, not counting inactive file
/// pages (cache the kernel reclaims before it kills), as `docker stats` counts it; the least
/// of these, as the kernel kills at whichever limit is reached first (a group's usage counts
/// its descendants'). `None` without a limit. cgroup v2 (`0::/path`, `memory.max`) and v1
/// (`N:memory:/path` under `root/memory`, `memory.limit_in_bytes`); in a namespace that shows
/// the group as the root, the groups at the path are absent and the root is the group.
pub fn cgroup_headroom(root: &Path, own: &str) -> Option<u64> {
    let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).ok();
    let inactive = |dir: &Path, key: &str| -> u64 {
        read(dir, "memory.stat")
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix(key)?.trim().parse().ok()))
            .unwrap_or(0)
    };
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (base, limit_file, usage_file, inactive_key) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max", "memory.current", "inactive_file ")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file ")
        } else {
            continue;
        };
        let headroom = Path::new(path.trim_start_matches('/'))
            .ancestors()
            .filter_map(|group| {
                let dir = base.join(group);
                // v2 writes `max` without a limit; v1 a number near 2⁶³.
                let limit = read(&dir, limit_file)?.trim().parse::<u64>().ok().filter(|&l| l < 1 << 60)?;
                let usage: u64 = read(&dir, usage_file)?.trim().parse().ok()?;
                Some(limit.saturating_sub(usage.saturating_sub(inactive(&dir, inactive_key))))
            })
            .min();
        return headroom;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paper's pair: GPT-2 124M student, GPT-2 XL-shaped teacher.
    fn paper_pair(teacher_dtype: DType) -> Footprint {
        Footprint {
            student_params: 124_439_808,
            student_dtype: DType::F32,
            teacher: Some((1_557_611_200, teacher_dtype)),
        }
    }

    #[test]
    fn the_floor_counts_the_student_four_times_and_the_teacher_once() {
        let f = paper_pair(DType::F32);
        assert_eq!(f.student_bytes(), 124_439_808 * 16);
        assert_eq!(f.teacher_bytes(), 1_557_611_200 * 4);
        assert_eq!(paper_pair(DType::BF16).teacher_bytes(), 1_557_611_200 * 2);
        let alone = Footprint { teacher: None, ..f };
        assert_eq!(alone.floor(), alone.student_bytes());
    }

    #[test]
    fn a_floor_over_the_available_memory_warns_with_the_lever_that_helps() {
        let f32_teacher = paper_pair(DType::F32);
        // 8.22 GB floor.
        assert!(f32_teacher.warning(9_000_000_000).is_none());
        let w = f32_teacher.warning(8_000_000_000).expect("8.2 GB do not fit in 8 GB");
        assert!(w.contains("at least 8.2 GB") && w.contains("8.0 GB of memory available"), "{w}");
        assert!(w.contains("--teacher-dtype bf16 would hold the teacher in 3.1 GB"), "{w}");
        let bf16_teacher = paper_pair(DType::BF16);
        let w = bf16_teacher.warning(4_000_000_000).expect("5.1 GB do not fit in 4 GB");
        assert!(!w.contains("--teacher-dtype"), "no lever left to suggest: {w}");
    }

    fn write(dir: &Path, files: &[(&str, &str)]) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
    }

    #[test]
    fn a_control_groups_limit_bounds_the_available_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // cgroup v2, the group at its path: 8 GiB limit, 5 GiB used of which 1 GiB inactive cache.
        let group = root.join("user.slice/job");
        let stat = "anon 4294967296\ninactive_file 1073741824\nactive_file 0\n";
        write(&group, &[("memory.max", "8589934592\n"), ("memory.current", "5368709120\n"), ("memory.stat", stat)]);
        assert_eq!(cgroup_headroom(root, "0::/user.slice/job\n"), Some((8 - 4) << 30));
        // No limit.
        write(&group, &[("memory.max", "max\n")]);
        assert_eq!(cgroup_headroom(root, "0::/user.slice/job\n"), None);
        // A namespace that shows the group as the root.
        write(root, &[("memory.max", "4294967296\n"), ("memory.current", "1073741824\n")]);
        assert_eq!(cgroup_headroom(root, "0::/\n"), Some(3 << 30));
        // cgroup v1, the memory controller among others.
        let v1 = root.join("memory/docker/abc");
        write(
            &v1,
            &[
                ("memory.limit_in_bytes", "2147483648\n"),
                ("memory.usage_in_bytes", "1073741824\n"),
                ("memory.stat", "total_inactive_file 536870912\n"),
            ],
        );
        let own = "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n";
        assert_eq!(cgroup_headroom(root, own), Some((2 << 30) - (1 << 29)));
        write(&v1, &[("memory.limit_in_bytes", "9223372036854771712\n")]);
        assert_eq!(cgroup_headroom(root, own), None);
        // A tighter limit on an ancestor group bounds its descendants.
        write(&v1, &[("memory.limit_in_bytes", "2147483648\n")]);
        write(
            &root.join("memory/docker"),
            &[("memory.limit_in_bytes", "1610612736\n"), ("memory.usage_in_bytes", "1073741824\n")],
        );
        assert_eq!(cgroup_headroom(root, own), Some(1 << 29));
        // No control group files at all.
        assert_eq!(cgroup_headroom(&root.join("absent"), own), None);
    }
}
