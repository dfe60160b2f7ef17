package atomicfile

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	name := filepath.Join(dir, "f.toml")
	if err := os.WriteFile(name, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := Write(name, []byte("new"), 0o640, OwnerOf(fi)); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(name)
	if err != nil || string(got) != "new" {
		t.Fatalf("content = %q, %v", got, err)
	}
	if st, _ := os.Stat(name); st.Mode().Perm() != 0o640 {
		t.Fatalf("mode = %v, want 0640", st.Mode().Perm())
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".*"+TempInfix+"*")); len(left) != 0 {
		t.Fatalf("temp files left: %v", left)
	}
}

func TestWriteFailedRenameLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	// A directory in the way makes the rename fail.
	name := filepath.Join(dir, "d")
	if err := os.MkdirAll(filepath.Join(name, "x"), 0o755); err != nil {
		t.Fatal(err)
	}
	err := Write(name, []byte("x"), 0o644)
	var le *os.LinkError
	if !errors.As(err, &le) {
		t.Fatalf("err = %v, want a *os.LinkError", err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".*"+TempInfix+"*")); len(left) != 0 {
		t.Fatalf("temp files left: %v", left)
	}
}
