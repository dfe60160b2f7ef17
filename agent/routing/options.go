package routing

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/pnet"
)

// Option sets an optional setting of a P2P router; NewP2P takes the
// required ones as arguments and checks them all.
type Option func(*p2pConfig)

type p2pConfig struct {
	listenAddr   string
	registryPort uint16
	identity     Identity
	psk          pnet.PSK
	pskSet       bool
	bootstrapper Bootstrapper
	logger       *slog.Logger

	provideValidity time.Duration
	// Bootstrap pacing; tests shorten these.
	bootstrapMinBackoff time.Duration
	bootstrapMaxBackoff time.Duration
	bootstrapRefresh    time.Duration
}

const (
	// defaultProvideValidity is how long peers keep our provider records. A
	// cluster does not need Amino's 48h: a short validity bounds how long a
	// withdrawn or vanished node is still returned by lookups, while the
	// reprovide traffic (every 2/3 of it) stays tiny on a LAN.
	defaultProvideValidity = 15 * time.Minute
	defaultMinBackoff      = 500 * time.Millisecond
	defaultMaxBackoff      = 30 * time.Second
	defaultRefresh         = time.Minute
)

func defaultConfig() p2pConfig {
	return p2pConfig{
		provideValidity:     defaultProvideValidity,
		bootstrapMinBackoff: defaultMinBackoff,
		bootstrapMaxBackoff: defaultMaxBackoff,
		bootstrapRefresh:    defaultRefresh,
	}
}

// WithNetworkKey makes the host a member of a libp2p private network:
// it connects only to hosts with the same 32-byte key. Without it the
// host talks to anyone who reaches its port.
func WithNetworkKey(psk []byte) Option {
	return func(c *p2pConfig) {
		c.psk, c.pskSet = pnet.PSK(psk), true
	}
}

// WithBootstrapper sets how peers to join are found. Without one the node is
// alone until other nodes join it.
func WithBootstrapper(b Bootstrapper) Option {
	return func(c *p2pConfig) {
		c.bootstrapper = b
	}
}

// WithLogger sets the logger; the default discards.
func WithLogger(l *slog.Logger) Option {
	return func(c *p2pConfig) {
		c.logger = l
	}
}

// WithProvideValidity sets how long provider records stay valid on peers; this
// node re-provides its keys every 2/3 of it. All agents of a cluster should
// use the same value, since each node expires the records it stores with its
// own setting.
func WithProvideValidity(d time.Duration) Option {
	return func(c *p2pConfig) {
		c.provideValidity = d
	}
}

// validate checks the arguments and options of NewP2P, naming every
// missing required argument.
func (c *p2pConfig) validate() error {
	var missing []string
	if c.listenAddr == "" {
		missing = append(missing, "listen address")
	}
	if c.registryPort == 0 {
		missing = append(missing, "registry port")
	}
	if c.identity.zero() {
		missing = append(missing, "identity (KeyIn or Key)")
	}
	if len(missing) > 0 {
		return errors.New("routing: missing required argument(s): " + strings.Join(missing, ", "))
	}
	if c.pskSet && len(c.psk) != 32 {
		return fmt.Errorf("routing: network key must be 32 bytes, got %d", len(c.psk))
	}
	if c.provideValidity < time.Second {
		return errors.New("routing: provide validity must be at least 1s")
	}
	return nil
}
