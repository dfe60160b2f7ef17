package routing

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/pnet"
)

// Option configures a P2P router.
type Option func(*p2pConfig) error

type p2pConfig struct {
	listenAddr   string
	registryPort uint16
	privKey      crypto.PrivKey
	psk          pnet.PSK
	dataDir      string
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

// WithListenAddr sets the host:port the libp2p host listens on over TCP
// (IPv4 or IPv6, e.g. "10.0.0.5:5001" or "[fd00::5]:5001"). Required. The
// host must be an IP; prefer the node's own IP over 0.0.0.0, which would also
// advertise bridge and loopback addresses to peers.
func WithListenAddr(hostPort string) Option {
	return func(c *p2pConfig) error {
		c.listenAddr = hostPort
		return nil
	}
}

// WithRegistryPort sets the port every agent serves its OCI registry on;
// Lookup returns peer IPs with this port. Required.
func WithRegistryPort(port uint16) Option {
	return func(c *p2pConfig) error {
		if port == 0 {
			return errors.New("registry port must not be 0")
		}
		c.registryPort = port
		return nil
	}
}

// WithPrivateKey sets the peer identity key. It takes precedence over WithDataDir.
func WithPrivateKey(k crypto.PrivKey) Option {
	return func(c *p2pConfig) error {
		c.privKey = k
		return nil
	}
}

// WithNetworkKey makes the host a member of a libp2p private network:
// it connects only to hosts with the same 32-byte key. Without it the
// host talks to anyone who reaches its port.
func WithNetworkKey(psk []byte) Option {
	return func(c *p2pConfig) error {
		if len(psk) != 32 {
			return fmt.Errorf("network key must be 32 bytes, got %d", len(psk))
		}
		c.psk = pnet.PSK(psk)
		return nil
	}
}

// WithDataDir sets a directory holding the peer identity key; the key is
// created on first start and reused after, so the peer ID survives restarts.
func WithDataDir(dir string) Option {
	return func(c *p2pConfig) error {
		c.dataDir = dir
		return nil
	}
}

// WithBootstrapper sets how peers to join are found. Without one the node is
// alone until other nodes join it.
func WithBootstrapper(b Bootstrapper) Option {
	return func(c *p2pConfig) error {
		c.bootstrapper = b
		return nil
	}
}

// WithLogger sets the logger; the default discards.
func WithLogger(l *slog.Logger) Option {
	return func(c *p2pConfig) error {
		c.logger = l
		return nil
	}
}

// WithProvideValidity sets how long provider records stay valid on peers; this
// node re-provides its keys every 2/3 of it. All agents of a cluster should
// use the same value, since each node expires the records it stores with its
// own setting.
func WithProvideValidity(d time.Duration) Option {
	return func(c *p2pConfig) error {
		if d < time.Second {
			return errors.New("provide validity must be at least 1s")
		}
		c.provideValidity = d
		return nil
	}
}

func (c *p2pConfig) validate() error {
	var missing []string
	if c.listenAddr == "" {
		missing = append(missing, "WithListenAddr")
	}
	if c.registryPort == 0 {
		missing = append(missing, "WithRegistryPort")
	}
	if c.privKey == nil && c.dataDir == "" {
		missing = append(missing, "WithPrivateKey or WithDataDir")
	}
	if len(missing) > 0 {
		return errors.New("routing: missing required option(s): " + strings.Join(missing, ", "))
	}
	return nil
}
