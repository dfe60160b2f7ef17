package kube

import (
	"fmt"
	"sync"
	"time"

	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// The kubelet exits on some start-up errors on purpose and relies on its
// "babysitter" to start it again: when cAdvisor's cgroup watch loses a
// race with a cgroup being removed, or the container manager fails to
// start (kubelet.go, initializeRuntimeDependentModules). On a real node
// that is systemd's Restart=always; here it is a supervisor. A kubelet
// that dies more than maxRestarts times within restartWindow is crash
// looping, which Healthy reports as a failure.
const (
	restartDelay  = time.Second
	restartWindow = time.Minute
	maxRestarts   = 3
)

// supervisor keeps one daemon running, restarting it when it exits.
type supervisor struct {
	name, log string
	start     func() (*cluster.Process, error)
	logf      func(string, ...any)

	mu       sync.Mutex
	proc     *cluster.Process
	exits    []time.Time
	err      error // set when it gave up
	stopping chan struct{}
	done     chan struct{}
}

func supervise(name, log string, start func() (*cluster.Process, error), logf func(string, ...any)) (*supervisor, error) {
	p, err := start()
	if err != nil {
		return nil, err
	}
	s := &supervisor{name: name, log: log, start: start, logf: logf, proc: p,
		stopping: make(chan struct{}), done: make(chan struct{})}
	go s.run()
	return s, nil
}

func (s *supervisor) run() {
	defer close(s.done)
	for {
		s.mu.Lock()
		p := s.proc
		s.mu.Unlock()
		select {
		case <-s.stopping:
			return
		case <-p.Done():
		}
		_, exitErr := p.Exited()
		now := time.Now()
		s.mu.Lock()
		s.exits = append(s.exits, now)
		recent := 0
		for _, t := range s.exits {
			if now.Sub(t) < restartWindow {
				recent++
			}
		}
		if recent > maxRestarts {
			s.err = fmt.Errorf("%s exited %d times within %v, the last time with %v; log tail:\n%s",
				s.name, recent, restartWindow, exitErr, cluster.TailFile(s.log, 20))
			s.mu.Unlock()
			return
		}
		s.mu.Unlock()
		s.logf("%s exited (%v); starting it again, as systemd's Restart=always would. Log tail:\n%s",
			s.name, exitErr, cluster.TailFile(s.log, 10))
		select {
		case <-s.stopping:
			return
		case <-time.After(restartDelay):
		}
		np, err := s.start()
		s.mu.Lock()
		if err != nil {
			s.err = fmt.Errorf("%s: restart: %w", s.name, err)
			s.mu.Unlock()
			return
		}
		s.proc = np
		s.mu.Unlock()
	}
}

// failed is the error that made the supervisor give up, or nil.
func (s *supervisor) failed() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

func (s *supervisor) pid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.proc.Pid()
}

func (s *supervisor) restarts() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.exits)
}

// stop ends supervision, then the daemon (SIGTERM, SIGKILL after grace).
func (s *supervisor) stop(grace time.Duration) error {
	select {
	case <-s.stopping:
	default:
		close(s.stopping)
	}
	<-s.done
	s.mu.Lock()
	p := s.proc
	s.mu.Unlock()
	return p.Stop(grace)
}
