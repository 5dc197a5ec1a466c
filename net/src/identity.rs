//! The persistent ed25519 identity of a peer: one key file, created on first start and
//! loaded afterwards, so the peer id (and the multiaddr that operators paste into node
//! configs) survives restarts.
//!
//! File format: the libp2p protobuf encoding of the keypair
//! ([`Keypair::to_protobuf_encoding`]), the same bytes go-libp2p and kubo store. The file
//! is created with mode 0600 by writing a temporary file in the same directory, fsyncing
//! it, renaming it into place (never over an existing file) and fsyncing the directory.
//! A key file that group or others can access is refused, as is anything that does not
//! decode to an ed25519 keypair. This module owns the key file only; it never logs or
//! returns the secret.

use std::{
    fs::File,
    io::{self, Read, Write},
    path::{Path, PathBuf},
};

use libp2p::identity::{KeyType, Keypair};
use zeroize::Zeroizing;

/// Larger than any protobuf-encoded ed25519 keypair (68 bytes); anything bigger is not a
/// key file and is refused before it is read into memory.
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// Why a key file could not be loaded or created. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read key file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot create key file {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error(
        "key file {path} is accessible by group or others (mode {mode:o}); \
         run `chmod 600 {path}` or remove it to create a new identity"
    )]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("key file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("key file {path} is larger than {MAX_KEY_FILE_BYTES} bytes; not a libp2p key")]
    TooLarge { path: PathBuf },
    #[error("key file {path} is corrupt: not a protobuf-encoded libp2p keypair ({reason})")]
    Corrupt { path: PathBuf, reason: String },
    #[error("key file {path} holds a {key_type:?} key; meshtune uses ed25519 only")]
    WrongKeyType { path: PathBuf, key_type: KeyType },
}

/// Where the keypair came from, so the caller can log it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    Loaded,
    Created,
}

/// Loads the keypair in `path`, or creates a new ed25519 keypair there if the file does
/// not exist. Missing parent directories are created (mode 0700 on unix).
pub fn load_or_create(path: &Path) -> Result<(Keypair, KeyOrigin), IdentityError> {
    match load(path) {
        Ok(keypair) => Ok((keypair, KeyOrigin::Loaded)),
        Err(IdentityError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            match create(path) {
                Ok(keypair) => Ok((keypair, KeyOrigin::Created)),
                // Another process created it between our read and our rename.
                Err(IdentityError::Create { source, .. })
                    if source.kind() == io::ErrorKind::AlreadyExists =>
                {
                    load(path).map(|keypair| (keypair, KeyOrigin::Loaded))
                }
                Err(error) => Err(error),
            }
        }
        Err(error) => Err(error),
    }
}

/// Loads an existing key file, checking its permissions first.
pub fn load(path: &Path) -> Result<Keypair, IdentityError> {
    let read_error = |source| IdentityError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    // Checked on the open handle, so the file we inspect is the file we read.
    let metadata = file.metadata().map_err(read_error)?;
    if !metadata.is_file() {
        return Err(IdentityError::NotAFile {
            path: path.to_owned(),
        });
    }
    check_private(path, &metadata)?;
    if metadata.len() > MAX_KEY_FILE_BYTES {
        return Err(IdentityError::TooLarge {
            path: path.to_owned(),
        });
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(128));
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(IdentityError::TooLarge {
            path: path.to_owned(),
        });
    }
    decode(path, &bytes)
}

/// Creates a new ed25519 key file at `path`; fails with `AlreadyExists` if one is there.
pub fn create(path: &Path) -> Result<Keypair, IdentityError> {
    let create_error = |source| IdentityError::Create {
        path: path.to_owned(),
        source,
    };
    let keypair = Keypair::generate_ed25519();
    let encoded = Zeroizing::new(keypair.to_protobuf_encoding().map_err(|error| {
        create_error(io::Error::other(format!("cannot encode keypair: {error}")))
    })?);
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    create_private_dir(&dir).map_err(create_error)?;

    let mut builder = tempfile::Builder::new();
    builder.prefix(".meshtune-key-");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Private from the first byte: the file is never visible with looser bits.
        builder.permissions(std::fs::Permissions::from_mode(0o600));
    }
    let mut temp = builder.tempfile_in(&dir).map_err(create_error)?;
    temp.write_all(&encoded).map_err(create_error)?;
    temp.as_file().sync_all().map_err(create_error)?;
    temp.persist_noclobber(path)
        .map_err(|error| create_error(error.error))?;
    sync_dir(&dir).map_err(create_error)?;
    Ok(keypair)
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Keypair, IdentityError> {
    let keypair =
        Keypair::from_protobuf_encoding(bytes).map_err(|error| IdentityError::Corrupt {
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
    match keypair.key_type() {
        KeyType::Ed25519 => Ok(keypair),
        key_type => Err(IdentityError::WrongKeyType {
            path: path.to_owned(),
            key_type,
        }),
    }
}

#[cfg(unix)]
fn check_private(path: &Path, metadata: &std::fs::Metadata) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path, _metadata: &std::fs::Metadata) -> Result<(), IdentityError> {
    Ok(())
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    // Makes the rename itself durable, not only the file's contents.
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn creates_then_reloads_the_same_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/dir/bootstrap.key");

        let (first, origin) = load_or_create(&path).expect("create");
        assert_eq!(origin, KeyOrigin::Created);
        #[cfg(unix)]
        {
            assert_eq!(mode_of(&path), 0o600);
            assert_eq!(mode_of(path.parent().expect("parent")), 0o700);
        }

        let (second, origin) = load_or_create(&path).expect("reload");
        assert_eq!(origin, KeyOrigin::Loaded);
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());

        // No temporary files are left next to the key.
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().expect("parent"))
            .expect("read_dir")
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name() != "bootstrap.key")
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn create_never_overwrites_an_existing_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        let first = create(&path).expect("create");
        let error = create(&path).expect_err("second create must fail");
        assert!(
            matches!(&error, IdentityError::Create { source, .. } if source.kind() == io::ErrorKind::AlreadyExists),
            "{error}"
        );
        let loaded = load(&path).expect("load");
        assert_eq!(first.public(), loaded.public());
    }

    #[cfg(unix)]
    #[test]
    fn refuses_group_or_other_access_and_names_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("open.key");
        create(&path).expect("create");
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let error = load_or_create(&path).expect_err("must refuse");
            assert!(
                matches!(error, IdentityError::InsecurePermissions { mode: m, .. } if m == mode),
                "{error}"
            );
            let message = error.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains("chmod 600"), "{message}");
        }
    }

    #[test]
    fn refuses_a_corrupt_key_and_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("corrupt.key");
        write_private(&path, b"definitely not a protobuf keypair");
        let error = load_or_create(&path).expect_err("must refuse");
        assert!(matches!(error, IdentityError::Corrupt { .. }), "{error}");
        assert!(error.to_string().contains(&path.display().to_string()));

        // A truncated valid key is corrupt as well, not silently regenerated.
        let good = Keypair::generate_ed25519()
            .to_protobuf_encoding()
            .expect("encode");
        write_private(&path, &good[..good.len() / 2]);
        let error = load(&path).expect_err("truncated must fail");
        assert!(matches!(error, IdentityError::Corrupt { .. }), "{error}");
    }

    #[test]
    fn refuses_oversized_and_empty_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big.key");
        write_private(&path, &vec![7u8; MAX_KEY_FILE_BYTES as usize + 1]);
        let error = load(&path).expect_err("oversized");
        assert!(matches!(error, IdentityError::TooLarge { .. }), "{error}");

        write_private(&path, b"");
        let error = load(&path).expect_err("empty");
        assert!(matches!(error, IdentityError::Corrupt { .. }), "{error}");
    }

    #[test]
    fn refuses_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let error = load(dir.path()).expect_err("directory");
        assert!(
            matches!(
                error,
                IdentityError::NotAFile { .. } | IdentityError::InsecurePermissions { .. }
            ),
            "{error}"
        );
    }

    fn write_private(path: &Path, bytes: &[u8]) {
        std::fs::write(path, bytes).expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
    }
}
