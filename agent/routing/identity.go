package routing

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/fleetmirror/fleetmirror/agent/internal/atomicfile"
	"github.com/libp2p/go-libp2p/core/crypto"
)

// KeyFile is the name of the identity key inside the data directory.
const KeyFile = "peer.key"

// Identity is where a router's peer identity key comes from: a file kept
// in a data directory (KeyIn) or a key in hand (Key).
type Identity struct {
	dir string
	key crypto.PrivKey
}

// IdentityKeyIn keeps the identity key in dir/KeyFile: created on first start and
// reused after, so the peer ID survives restarts.
func IdentityKeyIn(dir string) Identity { return Identity{dir: dir} }

// IdentityKey uses k as the identity key.
func IdentityKey(k crypto.PrivKey) Identity { return Identity{key: k} }

func (id Identity) zero() bool { return id.key == nil && id.dir == "" }

func (id Identity) load() (crypto.PrivKey, error) {
	if id.key != nil {
		return id.key, nil
	}
	return loadOrCreateKey(id.dir)
}

// loadOrCreateKey reads the identity key from dir, creating it on first use.
// The peer ID is derived from it, so keeping it makes restarts keep their ID.
func loadOrCreateKey(dir string) (crypto.PrivKey, error) {
	path := filepath.Join(dir, KeyFile)
	b, err := os.ReadFile(path)
	if err == nil {
		k, err := crypto.UnmarshalPrivateKey(b)
		if err != nil {
			return nil, fmt.Errorf("routing: identity key %s: %w", path, err)
		}
		return k, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("routing: identity key: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("routing: data dir: %w", err)
	}
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return nil, err
	}
	if b, err = crypto.MarshalPrivateKey(k); err != nil {
		return nil, err
	}
	// Write then rename, so a crash never leaves a truncated key behind.
	if err := atomicfile.Write(path, b, 0o600); err != nil {
		return nil, fmt.Errorf("routing: identity key: %w", err)
	}
	return k, nil
}
