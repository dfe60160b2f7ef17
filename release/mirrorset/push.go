package mirrorset

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/fleetmirror/fleetmirror/operator/imageref"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// Options configures Plan and Push.
type Options struct {
	// Keychain finds credentials per registry; default
	// authn.DefaultKeychain (Docker's config.json in $DOCKER_CONFIG or
	// ~/.docker, and its credential helpers).
	Keychain authn.Keychain
	// Transport carries every request; default remote.DefaultTransport.
	Transport http.RoundTripper
	// Images copied at once (default 4); each also uploads up to 4 blobs
	// at once.
	Jobs int
	// Insecure allows plain HTTP to registries that are not on loopback.
	Insecure bool
	Log      *slog.Logger
}

func (o Options) withDefaults() Options {
	if o.Keychain == nil {
		o.Keychain = authn.DefaultKeychain
	}
	if o.Transport == nil {
		o.Transport = remote.DefaultTransport
	}
	if o.Jobs <= 0 {
		o.Jobs = 4
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	return o
}

func (o Options) remote(ctx context.Context, extra ...remote.Option) []remote.Option {
	return append([]remote.Option{
		remote.WithContext(ctx),
		remote.WithAuthFromKeychain(o.Keychain),
		remote.WithTransport(o.Transport),
		remote.WithJobs(4),
	}, extra...)
}

// parse turns a canonical reference into the one go-containerregistry
// reads: by tag when there is one (it would drop the tag of name:tag@digest
// and neither check nor set it), else by digest.
func (o Options) parse(ref string) (name.Reference, error) {
	r, err := imageref.Parse(ref)
	if err != nil {
		return nil, err
	}
	repo, err := name.NewRepository(r.Name(), o.nameOpts()...)
	if err != nil {
		return nil, err
	}
	if r.Tag != "" {
		return repo.Tag(r.Tag), nil
	}
	return repo.Digest(r.Digest), nil
}

// Action says what Push did with an image.
type Action string

const (
	Present Action = "present" // the target had the digest under the tag already
	Tagged  Action = "tagged"  // the target had the digest; only the tag was set
	Copied  Action = "copied"
	Failed  Action = "failed"
)

// Step is one image's source and target.
type Step struct {
	Image  Image
	Source string // canonical source reference, with its digest
	Target string // imageref.Mirror(to, Source)
	// Present: the target already answers the reference with the digest.
	Present bool
	Action  Action
	Err     error
}

// Targets maps every image to its place under to ("registry[/prefix]")
// with imageref.Mirror, the operator's own rewrite.
func (s *Set) Targets(to string) ([]Step, error) {
	steps := make([]Step, 0, len(s.Images))
	for _, img := range s.Images {
		target, err := imageref.Mirror(to, img.Ref.String())
		if err != nil {
			return nil, fmt.Errorf("%s: %w", img.Name, err)
		}
		steps = append(steps, Step{Image: img, Source: img.Ref.String(), Target: target})
	}
	return steps, nil
}

// Plan says where each image would go and whether it is there already,
// without writing anything.
func Plan(ctx context.Context, s *Set, to string, o Options) ([]Step, error) {
	o = o.withDefaults()
	steps, err := s.Targets(to)
	if err != nil {
		return nil, err
	}
	for i := range steps {
		steps[i].Present, steps[i].Err = o.present(ctx, steps[i])
	}
	return steps, nil
}

// present asks the target for the reference (by tag when there is one)
// and compares the digest it answers with the pinned one.
func (o Options) present(ctx context.Context, st Step) (bool, error) {
	ref, err := o.parse(st.Target)
	if err != nil {
		return false, err
	}
	desc, err := remote.Head(ref, o.remote(ctx)...)
	var terr *transport.Error
	if errors.As(err, &terr) && terr.StatusCode == http.StatusNotFound {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("ask %s: %w", st.Target, err)
	}
	return desc.Digest.String() == st.Image.Ref.Digest, nil
}

// Push copies every image of the set under to. Indexes are copied whole
// with every platform, manifests byte for byte so digests stay the same,
// and blobs the target has already are not sent again. A failing image is
// reported by name and does not stop the others; the returned steps say
// what happened to each, and the error lists the failed ones.
func Push(ctx context.Context, s *Set, to string, o Options) ([]Step, error) {
	o = o.withDefaults()
	steps, err := s.Targets(to)
	if err != nil {
		return nil, err
	}
	sem := make(chan struct{}, o.Jobs)
	var wg sync.WaitGroup
	for i := range steps {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			st := &steps[i]
			start := time.Now()
			st.Action, st.Err = o.copy(ctx, st)
			if st.Err != nil {
				st.Action = Failed
				o.Log.Error("mirror failed", "image", st.Image.Name, "source", st.Source, "err", st.Err)
				return
			}
			o.Log.Info("mirrored", "image", st.Image.Name, "target", st.Target, "action", st.Action, "took", time.Since(start).Round(time.Millisecond))
		})
	}
	wg.Wait()
	var errs []error
	for _, st := range steps {
		if st.Err != nil {
			errs = append(errs, fmt.Errorf("%s (%s, %s): %w", st.Image.Name, st.Source, st.Image.File, st.Err))
		}
	}
	if len(errs) > 0 {
		return steps, fmt.Errorf("%d of %d images failed, the others were copied:\n%w", len(errs), len(steps), errors.Join(errs...))
	}
	return steps, nil
}

func (o Options) copy(ctx context.Context, st *Step) (Action, error) {
	present, err := o.present(ctx, *st)
	if err != nil {
		return Failed, err
	}
	if present {
		st.Present = true
		return Present, nil
	}
	pinned, err := v1.NewHash(st.Image.Ref.Digest)
	if err != nil {
		return Failed, err
	}
	src, err := o.parse(st.Image.Ref.Name() + "@" + st.Image.Ref.Digest)
	if err != nil {
		return Failed, err
	}
	dst, err := o.parse(st.Target)
	if err != nil {
		return Failed, err
	}
	// Already there under its digest (pushed under another tag): only tag.
	if byDigest, err := remote.Head(dst.Context().Digest(pinned.String()), o.remote(ctx)...); err == nil && byDigest.Digest == pinned && st.Image.Ref.Tag != "" {
		desc, err := remote.Get(dst.Context().Digest(pinned.String()), o.remote(ctx)...)
		if err != nil {
			return Failed, err
		}
		return Tagged, remote.Tag(dst.Context().Tag(st.Image.Ref.Tag), desc, o.remote(ctx)...)
	}
	desc, err := remote.Get(src, o.remote(ctx)...)
	if err != nil {
		return Failed, fmt.Errorf("read source: %w", err)
	}
	if desc.Digest != pinned {
		return Failed, fmt.Errorf("source answered digest %s, the Dockerfile pins %s", desc.Digest, pinned)
	}
	if err := o.write(ctx, st.Image.Name, desc, dst); err != nil {
		return Failed, fmt.Errorf("write %s: %w", st.Target, err)
	}
	got, err := remote.Head(dst, o.remote(ctx)...)
	if err != nil {
		return Failed, fmt.Errorf("check %s: %w", st.Target, err)
	}
	if got.Digest != pinned {
		return Failed, fmt.Errorf("%s has digest %s after the copy, want %s", st.Target, got.Digest, pinned)
	}
	return Copied, nil
}

// write copies desc (an image or an index) to dst, logging its progress.
func (o Options) write(ctx context.Context, image string, desc *remote.Descriptor, dst name.Reference) error {
	progress := make(chan v1.Update, 16)
	done := o.logProgress(image, progress)
	defer func() { <-done }()
	if desc.MediaType.IsIndex() {
		idx, err := desc.ImageIndex()
		if err != nil {
			close(progress)
			return err
		}
		return remote.WriteIndex(dst, idx, o.remote(ctx, remote.WithProgress(progress))...)
	}
	img, err := desc.Image()
	if err != nil {
		close(progress)
		return err
	}
	return remote.Write(dst, img, o.remote(ctx, remote.WithProgress(progress))...)
}

// logProgress logs an image's upload progress at most every 2 seconds,
// until the channel is closed.
func (o Options) logProgress(image string, ch <-chan v1.Update) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		last := time.Now()
		for u := range ch {
			if time.Since(last) >= 2*time.Second && u.Total > 0 {
				last = time.Now()
				o.Log.Info("copying", "image", image, "bytes", u.Complete, "of", u.Total)
			}
		}
	}()
	return done
}

// Pin resolves each image's tag at its source and rewrites its Dockerfile
// with the digest the registry answers. It is how the pinned digests are
// refreshed; review the diff before committing it.
func Pin(ctx context.Context, s *Set, o Options) ([]Step, error) {
	o = o.withDefaults()
	var errs []error
	steps := make([]Step, 0, len(s.Images))
	for _, img := range s.Images {
		st := Step{Image: img, Source: img.Ref.String()}
		if img.Ref.Tag == "" {
			st.Err = fmt.Errorf("%s has no tag to resolve; pin it by hand", img.File)
		} else if ref, err := name.NewTag(img.Ref.Name()+":"+img.Ref.Tag, o.nameOpts()...); err != nil {
			st.Err = err
		} else if desc, err := remote.Head(ref, o.remote(ctx)...); err != nil {
			st.Err = fmt.Errorf("resolve %s: %w", ref, err)
		} else {
			r := img.Ref
			r.Digest = desc.Digest.String()
			st.Target = r.String()
			st.Present = r.Digest == img.Ref.Digest
			st.Err = os.WriteFile(img.File, []byte("FROM "+st.Target+"\n"), 0o644)
		}
		if st.Err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", img.Name, st.Err))
		}
		steps = append(steps, st)
	}
	return steps, errors.Join(errs...)
}

func (o Options) nameOpts() []name.Option {
	if o.Insecure {
		return []name.Option{name.Insecure}
	}
	return nil
}
