//! Container ids: what runc accepts (`[A-Za-z0-9_+.-]+`, not `.` or `..`), so that an id is
//! always one safe path component.

use crate::ContainerError;

pub fn validate(id: &str) -> Result<(), ContainerError> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 1024
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::InvalidId(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_like_and_empty_ids_are_rejected() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", "x\0"] {
            assert!(validate(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn docker_and_containerd_ids_are_accepted() {
        for good in ["c1", "my-container_1.2", "a+b", &"f".repeat(64)] {
            validate(good).unwrap();
        }
    }
}
