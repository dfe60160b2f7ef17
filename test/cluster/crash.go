package cluster

import (
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"
)

// Crash tests run a cluster in a child process (the test binary itself,
// running one test with a helper variable set), kill it with SIGKILL so no
// Close runs, and check what CleanupLeftovers makes of the remains.

// AnnounceRunAndWait is the child's side: it tells the parent which run
// to look for, then waits to be killed.
func AnnounceRunAndWait(id, dir string) {
	fmt.Printf("RUN %s %s\n", id, dir)
	time.Sleep(time.Minute)
	os.Exit(2)
}

var runLine = regexp.MustCompile(`RUN ([0-9a-f]{6}) (\S+)\n`)

// CrashChild is the parent's side: it runs test in a child with env added,
// waits up to timeout for the child's AnnounceRunAndWait, kills the child
// and returns the run's ID and work dir.
func CrashChild(t testing.TB, test string, env []string, timeout time.Duration) (id, dir string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$")
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var got strings.Builder
	buf := make([]byte, 4096)
	deadline := time.Now().Add(timeout)
	for id == "" && time.Now().Before(deadline) {
		n, err := out.Read(buf)
		got.Write(buf[:n])
		if m := runLine.FindStringSubmatch(got.String()); m != nil {
			id, dir = m[1], m[2]
		}
		if err != nil {
			break
		}
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	if id == "" {
		t.Fatalf("helper did not start a cluster: %s", got.String())
	}
	return id, dir
}
