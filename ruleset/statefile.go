package ruleset

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// FileBackend keeps the live ruleset in a JSON state file. It stands in for
// the datapath where no kernel is wanted (tests of the command language, and
// `--state FILE`); it has no counters.
type FileBackend struct {
	Path string
}

func (f *FileBackend) Load() (*Ruleset, error) {
	data, err := os.ReadFile(f.Path)
	if errors.Is(err, os.ErrNotExist) {
		return &Ruleset{NextHandle: 1}, nil
	}
	if err != nil {
		return nil, err
	}
	rs := &Ruleset{}
	if err := json.Unmarshal(data, rs); err != nil {
		return nil, fmt.Errorf("state file %s is corrupt: %w", f.Path, err)
	}
	return rs, nil
}

func (f *FileBackend) Check(*Ruleset) error { return nil }

// Lock takes the writer lock of the state file (PATH.lock); readers read
// the file, which is replaced atomically, without it.
func (f *FileBackend) Lock() (func(), error) { return Lock(f.Path + ".lock") }

func (f *FileBackend) Commit(rs *Ruleset) error {
	data, err := json.Marshal(rs)
	if err != nil {
		return err
	}
	return WriteFileAtomic(f.Path, data, 0o600)
}

func (f *FileBackend) Counters() (map[uint64]Counter, error) { return map[uint64]Counter{}, nil }

func (f *FileBackend) ResetCounters([]uint64) error { return nil }

// WriteFileAtomic writes data to path so that readers see the old file or
// the new one, never a part: temp file in the same directory, fsync, rename,
// fsync of the directory.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// Lock takes an exclusive lock on path (created if needed), so concurrent
// sfunnel invocations run their transactions one after another. The
// returned func releases it.
func Lock(path string) (func(), error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return func() {
		unix.Flock(int(f.Fd()), unix.LOCK_UN)
		f.Close()
	}, nil
}

// SaveFile writes a saved ruleset to path atomically, as an editor would:
// a symlink is followed (its target is replaced), an existing file keeps
// its mode, and a missing directory is an error rather than created.
func SaveFile(path string, data []byte) error {
	if target, err := filepath.EvalSymlinks(path); err == nil {
		path = target
	}
	perm := os.FileMode(0o644)
	if st, err := os.Stat(path); err == nil {
		perm = st.Mode().Perm()
	}
	if st, err := os.Stat(filepath.Dir(path)); err != nil || !st.IsDir() {
		return fmt.Errorf("cannot save to %s: directory %s does not exist", path, filepath.Dir(path))
	}
	return WriteFileAtomic(path, data, perm)
}
