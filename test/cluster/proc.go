package cluster

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is a child process whose output goes to a log file.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // valid after done is closed
}

// startInNetns runs bin with args in network namespace ns via nsenter, which
// execs the binary so the pid we hold is the daemon itself. nsenter --net
// (unlike `ip netns exec`) keeps the host mount namespace, so the node's
// containerd and agent see the same files the harness sees. env (may be
// nil) is added to the harness's environment.
func startInNetns(ns, logPath string, env []string, bin string, args ...string) (*proc, error) {
	return startInNamespaces(ns, "", logPath, env, bin, args...)
}

// startInNamespaces is startInNetns that also enters the persistent mount
// namespace pinned at mntns (see Options.PrivateMounts) unless it is "".
func startInNamespaces(ns, mntns, logPath string, env []string, bin string, args ...string) (*proc, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	nsArgs := []string{"--net=" + nsPath(ns)}
	if mntns != "" {
		nsArgs = append(nsArgs, "--mount="+mntns)
	}
	cmd := exec.Command("nsenter", append(append(nsArgs, "--", bin), args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	// Own process group so a terminal's ^C reaches only the harness, which
	// then cleans up; Pdeathsig so a crashed harness leaves no daemons.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := startOnSpawnerThread(cmd); err != nil {
		return nil, fmt.Errorf("start %s in %s: %w", bin, ns, err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Pdeathsig fires when the *thread* that forked the child exits, not the
// process. Go threads normally live forever, but listenInNetns deliberately
// lets a thread die (it has been switched into another namespace), and that
// thread may earlier have forked a daemon. So all daemons are forked from
// one locked thread that never exits.
var (
	spawnOnce sync.Once
	spawnCh   chan func()
)

func startOnSpawnerThread(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		spawnCh = make(chan func())
		go func() {
			runtime.LockOSThread()
			for f := range spawnCh {
				f()
			}
		}()
	})
	errc := make(chan error, 1)
	spawnCh <- func() { errc <- cmd.Start() }
	return <-errc
}

// stop sends sig and waits up to grace, then SIGKILLs and waits.
func (p *proc) stop(sig syscall.Signal, grace time.Duration) error {
	if p.exited() {
		return nil
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
		return nil
	case <-time.After(grace):
	}
	_ = p.cmd.Process.Kill()
	select {
	case <-p.done:
		return fmt.Errorf("pid %d ignored %v for %v, killed", p.pid(), sig, grace)
	case <-time.After(10 * time.Second):
		return fmt.Errorf("pid %d survives SIGKILL", p.pid())
	}
}

// TailFile returns the last n lines of a log file, for failure messages.
func TailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	var sb strings.Builder
	for _, l := range lines {
		sb.Write(l)
		sb.WriteByte('\n')
	}
	return sb.String()
}
