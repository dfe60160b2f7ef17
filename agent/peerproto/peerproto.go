// Package peerproto is the wire protocol of the agent's registry: what one
// agent sends another when it asks for content, what the node's registry
// answers its clients (containerd and the debug page), and how an answer is
// checked before it is believed. Agents of two adjacent versions meet
// during a rolling update, so every byte defined here is a contract
// between them: change it only in a way the previous version understands.
package peerproto

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/fleetmirror/fleetmirror/agent/oci"
)

// PeerHeader marks a request from another agent, and carries its proof of
// membership (see agent/peerauth); agents before membership set it to "1".
// A peer answers such a request from its own store only and never forwards
// it, so a lookup can never loop between agents.
const PeerHeader = "X-Fleetmirror-Peer"

// AnswerHeader carries the proof that an answer came from a member (see
// agent/peerauth).
const AnswerHeader = "X-Fleetmirror-Peer-Answer"

// WaitHeader asks a peer to wait up to the given duration ("2s") for a
// blob its containerd is about to fetch to appear in flight, instead of
// answering 404 at once. Agents that predate it ignore it.
const WaitHeader = "X-Fleetmirror-Wait"

// FollowWait is how long a node waits for the first bytes of the node it
// agreed to follow (see agent/claim), which sends its headers with them,
// and so how long that node waits for its containerd's first byte on the
// follower's behalf. That containerd must first get them from upstream,
// and on containerd 2.x the last layer of an image only starts once
// another has finished (3 requests at a time): at 20 nodes × 500 MB on
// 2 cores it started 21-22 s late, past the 20 s this was before.
// containerd itself waits minutes for progress (image_pull_progress_timeout,
// 5 min), so this stays well inside it; a node that is gone fails at once
// (connection refused or reset). Other peers keep the short header timeout.
const FollowWait = time.Minute

// MaxWait bounds what WaitHeader may ask for.
const MaxWait = 5 * time.Second

// ImageWaitHeader asks a peer to wait up to the given duration, at most
// MaxImageWait, for a blob that a manifest its containerd pulls names to
// appear in flight (see agent/claim: the node that fetches an image for a
// burst, or one that follows it). Its containerd fetches 3 blobs at a
// time, so the last layer starts only once another is done; a peer that
// pulls no image with that blob waits only WaitHeader's duration, so a
// stale agreement costs a follower no more than before. Agents that
// predate it ignore it and wait WaitHeader's.
const ImageWaitHeader = "X-Fleetmirror-Wait-Image"

// MaxImageWait bounds what ImageWaitHeader may ask for. The first bytes
// are waited for after it, up to FollowWait: at 20 nodes × 500 MB on
// 2 cores the last layer started 21-22 s late.
const MaxImageWait = 30 * time.Second

// SourceHeader tells a client of the node's registry where a response's
// content came from: SourceLocal, SourceInFlight, or SourcePeer followed by
// the peers' registry addresses when known ("peer 10.0.0.12:30120"). The
// debug page's Measure Image Pull reads it; containerd ignores it.
const SourceHeader = "X-Fleetmirror-Source"

// Values of SourceHeader.
const (
	SourceLocal    = "local"
	SourcePeer     = "peer"
	SourceInFlight = "in-flight"
)

// PeerSource is the SourceHeader value for content from peers.
func PeerSource(peers []netip.AddrPort) string {
	s := SourcePeer
	for i, p := range peers {
		if i == 0 {
			s += " "
		} else {
			s += ","
		}
		s += p.String()
	}
	return s
}

// ParseSource reads a SourceHeader value: the source ("unknown" when
// empty) and the peers it names.
func ParseSource(h string) (string, []string) {
	src, peers, _ := strings.Cut(h, " ")
	if src == "" {
		src = "unknown"
	}
	out := []string{}
	for _, p := range strings.Split(peers, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return src, out
}

// Path segments of the distribution API a URL names content by.
const (
	Manifests = "manifests"
	Blobs     = "blobs"
)

// URL is where base (a registry's root, "http://10.0.0.12:30120") serves
// content: /v2/<repository>/<segment>/<ref>, with the registry the
// content is from as the ns parameter, as containerd sends it to a mirror.
func URL(base, repository, segment, ref, registry string) string {
	u := strings.TrimSuffix(base, "/") + "/v2/" + repository + "/" + segment + "/" + ref
	if registry != "" {
		u += "?ns=" + registry
	}
	return u
}

// PeerURL is URL for a peer's registry.
func PeerURL(p netip.AddrPort, req oci.Request, segment, ref string) string {
	return URL("http://"+p.String(), req.Repository, segment, ref, req.Registry)
}

// MaxManifestSize bounds a manifest read into memory; registries refuse
// manifests over 4 MiB as well.
const MaxManifestSize = 4 << 20

// MaxBlobSize is the largest blob a peer is believed to hold. The size
// the manifest gives is not known to the agent, so a peer's Content-Length
// is taken as the blob's size; one beyond any real layer is a lie that
// would have the agent promise containerd a transfer without end.
const MaxBlobSize = 1 << 40

// CheckBlobSize refuses a size a peer claims that no blob has.
func CheckBlobSize(n int64) error {
	if n < 0 || n > MaxBlobSize {
		return fmt.Errorf("peer claims a blob of %d bytes (want 0 to %d)", n, int64(MaxBlobSize))
	}
	return nil
}

// ReadManifest reads a manifest body, at most one byte more than
// MaxManifestSize (so that VerifyManifest refuses a longer one).
func ReadManifest(r io.Reader) ([]byte, error) {
	return io.ReadAll(io.LimitReader(r, MaxManifestSize+1))
}

// VerifyManifest checks a manifest body is the content d names, and has
// size bytes when size is not negative.
func VerifyManifest(body []byte, d digest.Digest, size int64) error {
	if (size >= 0 && int64(len(body)) != size) || len(body) > MaxManifestSize || digest.FromBytes(body) != d {
		return fmt.Errorf("manifest body does not match digest %s", d)
	}
	return nil
}

// DescriptorOf reads what an answer claims about content (its
// Docker-Content-Digest, Content-Length and Content-Type) and checks it
// against the digest asked for, when one was.
func DescriptorOf(resp *http.Response, want digest.Digest) (ocispec.Descriptor, error) {
	d, err := oci.ParseDigest(resp.Header.Get("Docker-Content-Digest"))
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("peer sent no usable Docker-Content-Digest: %w", err)
	}
	if want != "" && d != want {
		return ocispec.Descriptor{}, fmt.Errorf("peer answered %s for %s", d, want)
	}
	if resp.ContentLength < 0 {
		return ocispec.Descriptor{}, errors.New("peer sent no Content-Length")
	}
	if err := CheckBlobSize(resp.ContentLength); err != nil {
		return ocispec.Descriptor{}, err
	}
	return ocispec.Descriptor{MediaType: resp.Header.Get("Content-Type"), Digest: d, Size: resp.ContentLength}, nil
}

// ResumeRange is the Range header a peer sends to resume a blob at off.
func ResumeRange(off int64) string {
	return fmt.Sprintf("bytes=%d-", off)
}

// ParseResumeRange reads a Range header as peers send it to resume:
// "bytes=N-", or none (from 0).
func ParseResumeRange(h string) (int64, bool) {
	if h == "" {
		return 0, true
	}
	n, ok := strings.CutPrefix(h, "bytes=")
	if !ok || !strings.HasSuffix(n, "-") {
		return 0, false
	}
	off, err := strconv.ParseInt(strings.TrimSuffix(n, "-"), 10, 64)
	return off, err == nil && off >= 0
}

// ContentSize checks a blob answer starts where it was asked to (off) and
// returns the blob's full size.
func ContentSize(resp *http.Response, off int64) (int64, error) {
	if off == 0 {
		if resp.StatusCode != http.StatusOK {
			return 0, fmt.Errorf("status %s", resp.Status)
		}
		if resp.ContentLength < 0 {
			return 0, errors.New("peer sent no Content-Length")
		}
		return resp.ContentLength, CheckBlobSize(resp.ContentLength)
	}
	if resp.StatusCode != http.StatusPartialContent {
		return 0, fmt.Errorf("status %s to a Range request", resp.Status)
	}
	var start, end, size int64
	if _, err := fmt.Sscanf(resp.Header.Get("Content-Range"), "bytes %d-%d/%d", &start, &end, &size); err != nil {
		return 0, fmt.Errorf("bad Content-Range %q", resp.Header.Get("Content-Range"))
	}
	if start != off || end != size-1 {
		return 0, fmt.Errorf("Content-Range %q does not resume at %d", resp.Header.Get("Content-Range"), off)
	}
	return size, CheckBlobSize(size)
}

// ManifestAccept is the Accept header of a request for a manifest, as
// containerd sends it.
var ManifestAccept = strings.Join(oci.ManifestTypes, ", ")
