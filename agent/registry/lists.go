package registry

import (
	"encoding/json"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"github.com/fleetmirror/fleetmirror/agent/oci"
)

// serveUnqualifiedTag answers a tag asked for without ns, as independent
// clients (skopeo, crane, the conformance suite) ask: from this node's
// store when exactly one registry's image holds name:tag. Every 404 says
// why, since the client sees only the body.
func (r *Registry) serveUnqualifiedTag(w http.ResponseWriter, req *http.Request, oreq oci.Request) {
	ref := oreq.Repository + ":" + oreq.Tag
	var registries []string
	for _, k := range r.store.Keys() {
		if reg, repo, tag, ok := oci.SplitTagKey(k); ok && repo == oreq.Repository && tag == oreq.Tag {
			registries = append(registries, reg)
		}
	}
	switch len(registries) {
	case 0:
		writeError(w, http.StatusNotFound, "MANIFEST_UNKNOWN", ref+" is not on this node; a tag without the ns parameter "+
			"names no registry, so other nodes were not asked: add ?ns=<registry the image is pulled from> to look across the cluster")
		return
	case 1:
	default:
		writeError(w, http.StatusNotFound, "MANIFEST_UNKNOWN", ref+" is on this node from several registries ("+
			strings.Join(registries, ", ")+"): add ?ns=<registry> to pick one")
		return
	}
	d, err := r.store.Resolve(req.Context(), oci.TagKey(registries[0], oreq.Repository, oreq.Tag))
	if err == nil {
		// By digest, so the request still counts under registry "unknown":
		// the client named none.
		byDigest := oreq
		byDigest.Tag, byDigest.Digest = "", d
		if r.serveLocal(w, req, byDigest) {
			return
		}
	}
	writeError(w, http.StatusNotFound, "MANIFEST_UNKNOWN", ref+" ("+registries[0]+") was removed from this node while it was asked for")
}

// serveList answers the listing endpoints from this node alone.
func (r *Registry) serveList(w http.ResponseWriter, req *http.Request, l oci.List) {
	switch l.Kind {
	case oci.ListCatalog:
		writeError(w, http.StatusNotFound, "UNSUPPORTED", "this mirror lists no repositories: it serves the images "+
			"nodes pulled, by name; /v2/<name>/tags/list lists the tags this node holds for a name")
	case oci.ListReferrers:
		// A 404 is what tells clients to fall back to the referrers tag
		// schema (distribution-spec 1.1); any other status breaks them.
		writeError(w, http.StatusNotFound, "UNSUPPORTED", "this mirror does not serve the referrers API; "+
			"use the referrers tag schema ("+l.Subject.Algorithm().String()+"-"+l.Subject.Encoded()+")")
	case oci.ListTags:
		r.serveTags(w, req, l)
	}
}

// serveTags lists the tags this node holds for a name (of the ns registry
// when given, else of any), sorted, paginated with n and last as the
// distribution spec says.
func (r *Registry) serveTags(w http.ResponseWriter, req *http.Request, l oci.List) {
	q := req.URL.Query()
	n := -1
	if s := q.Get("n"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 0 {
			writeError(w, http.StatusBadRequest, "UNSUPPORTED", "n="+s+": want a count of tags, 0 or more")
			return
		}
		n = v
	}
	last := q.Get("last")
	tags := []string{}
	for _, k := range r.store.Keys() {
		reg, repo, tag, ok := oci.SplitTagKey(k)
		if !ok || repo != l.Repository || (l.Registry != "" && reg != l.Registry) || (last != "" && tag <= last) {
			continue
		}
		tags = append(tags, tag)
	}
	slices.Sort(tags)
	tags = slices.Compact(tags)
	if n >= 0 && len(tags) > n {
		tags = tags[:n]
		if n > 0 {
			next := url.Values{"n": {strconv.Itoa(n)}, "last": {tags[n-1]}}
			if l.Registry != "" {
				next.Set("ns", l.Registry)
			}
			w.Header().Set("Link", "</v2/"+l.Repository+"/tags/list?"+next.Encode()+`>; rel="next"`)
		}
	}
	body, err := json.Marshal(struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}{l.Repository, tags})
	if err != nil {
		writeError(w, http.StatusInternalServerError, "UNKNOWN", err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	w.WriteHeader(http.StatusOK)
	if req.Method != http.MethodHead {
		w.Write(body)
	}
}
