using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text;

namespace Backup.Block.Security;

/// <summary>
/// A TLS-PSK session over a byte stream (QEMU's tls-creds-psk), driven through libssl with two memory
/// BIOs: ciphertext from the transport is fed in, ciphertext OpenSSL produces is drained out, so all
/// network I/O stays asynchronous. One reader and one writer may run at once, as with SslStream: libssl
/// calls are serialized by a lock, transport writes by a semaphore so records leave in the order made.
/// </summary>
internal sealed class PskTlsStream : Stream
{
    /// <summary>Plaintext handed to SSL_write at once: a few records, so drained ciphertext stays small.</summary>
    private const int WriteChunk = 64 * 1024;

    private readonly Stream _transport;
    private readonly TlsCredentialsPsk _credentials;
    private readonly nint _ssl;
    private readonly nint _readBio;
    private readonly nint _writeBio;
    private readonly Lock _sslLock = new();
    private readonly SemaphoreSlim _sendLock = new(1, 1);
    private readonly byte[] _incoming = new byte[32 * 1024];
    private GCHandle _self;
    private int _disposed;

    private unsafe PskTlsStream(Stream transport, TlsCredentialsPsk credentials, bool server)
    {
        _transport = transport;
        _credentials = credentials;
        var ctx = LibSsl.NewPskContext(server);
        try
        {
            if (server)
            {
                LibSsl.SSL_CTX_set_psk_server_callback(ctx, &ServerKey);
            }
            else
            {
                LibSsl.SSL_CTX_set_psk_client_callback(ctx, &ClientKey);
            }
            _ssl = LibSsl.SSL_new(ctx);
            if (_ssl == 0)
            {
                throw new TlsException($"TLS handshake failed: {LibSsl.TakeError()}");
            }
        }
        finally
        {
            LibSsl.SSL_CTX_free(ctx); // the session holds its own reference
        }
        _readBio = LibSsl.NewMemoryBio();
        _writeBio = LibSsl.NewMemoryBio();
        LibSsl.SSL_set_bio(_ssl, _readBio, _writeBio); // the session owns both from here
        _self = GCHandle.Alloc(this, GCHandleType.Weak);
        _ = LibSsl.SSL_set_ex_data(_ssl, 0, GCHandle.ToIntPtr(_self));
        if (server)
        {
            LibSsl.SSL_set_accept_state(_ssl);
        }
        else
        {
            LibSsl.SSL_set_connect_state(_ssl);
        }
    }

    /// <summary>Server: the identity the client proved it holds a key for (tls-authz checks it).</summary>
    public string? PeerIdentity { get; private set; }

    /// <summary>Why the last key lookup failed, in QEMU's words, for the handshake error.</summary>
    private string? _keyProblem;

    public static async ValueTask<PskTlsStream> HandshakeAsync(Stream transport, TlsCredentialsPsk credentials, bool server,
        CancellationToken cancellationToken)
    {
        var stream = new PskTlsStream(transport, credentials, server);
        try
        {
            await stream.HandshakeAsync(cancellationToken).ConfigureAwait(false);
            return stream;
        }
        catch
        {
            await stream.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    private async ValueTask HandshakeAsync(CancellationToken cancellationToken)
    {
        while (true)
        {
            var (done, error, message) = Step();
            try
            {
                await FlushAsync(cancellationToken).ConfigureAwait(false);
            }
            catch (IOException) when (!done && error != LibSsl.SSL_ERROR_WANT_READ)
            {
                // The alert could not be sent; the handshake error below is what matters.
            }
            if (done)
            {
                return;
            }
            if (error != LibSsl.SSL_ERROR_WANT_READ)
            {
                throw new TlsException($"TLS handshake failed: {_keyProblem ?? message}");
            }
            var n = await _transport.ReadAsync(_incoming, cancellationToken).ConfigureAwait(false);
            if (n == 0)
            {
                throw new TlsException($"TLS handshake failed: {_keyProblem ?? "The TLS connection was non-properly terminated."}");
            }
            Feed(_incoming.AsSpan(0, n));
        }
    }

    private (bool Done, int Error, string? Message) Step()
    {
        lock (_sslLock)
        {
            ThrowIfDisposed();
            LibSsl.ERR_clear_error();
            var r = LibSsl.SSL_do_handshake(_ssl);
            if (r == 1)
            {
                return (true, LibSsl.SSL_ERROR_NONE, null);
            }
            var error = LibSsl.SSL_get_error(_ssl, r);
            return (false, error, error == LibSsl.SSL_ERROR_WANT_READ ? null : LibSsl.TakeError());
        }
    }

    private unsafe void Feed(ReadOnlySpan<byte> ciphertext)
    {
        lock (_sslLock)
        {
            ThrowIfDisposed();
            fixed (byte* p = ciphertext)
            {
                _ = LibSsl.BIO_write(_readBio, p, ciphertext.Length); // a memory BIO takes everything
            }
        }
    }

    public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        if (buffer.IsEmpty)
        {
            return 0;
        }
        while (true)
        {
            var (count, error, message, output) = Decrypt(buffer.Span);
            if (output)
            {
                // TLS 1.3 post-handshake messages (key update) may need an answer.
                await FlushAsync(cancellationToken).ConfigureAwait(false);
            }
            if (count > 0)
            {
                return count;
            }
            if (error == LibSsl.SSL_ERROR_ZERO_RETURN)
            {
                return 0;
            }
            if (error != LibSsl.SSL_ERROR_WANT_READ)
            {
                throw new IOException($"TLS: {message}");
            }
            var n = await _transport.ReadAsync(_incoming, cancellationToken).ConfigureAwait(false);
            if (n == 0)
            {
                return 0;
            }
            Feed(_incoming.AsSpan(0, n));
        }
    }

    private unsafe (int Count, int Error, string? Message, bool Output) Decrypt(Span<byte> destination)
    {
        lock (_sslLock)
        {
            ThrowIfDisposed();
            LibSsl.ERR_clear_error();
            int r;
            fixed (byte* p = destination)
            {
                r = LibSsl.SSL_read(_ssl, p, destination.Length);
            }
            var output = LibSsl.Pending(_writeBio) > 0;
            if (r > 0)
            {
                return (r, LibSsl.SSL_ERROR_NONE, null, output);
            }
            var error = LibSsl.SSL_get_error(_ssl, r);
            return (0, error, error is LibSsl.SSL_ERROR_WANT_READ or LibSsl.SSL_ERROR_ZERO_RETURN ? null : LibSsl.TakeError(), output);
        }
    }

    public override async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
    {
        await _sendLock.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            while (!buffer.IsEmpty)
            {
                var chunk = Math.Min(buffer.Length, WriteChunk);
                Encrypt(buffer.Span[..chunk]);
                buffer = buffer[chunk..];
                await DrainAsync(cancellationToken).ConfigureAwait(false);
            }
        }
        finally
        {
            _sendLock.Release();
        }
    }

    private unsafe void Encrypt(ReadOnlySpan<byte> plaintext)
    {
        lock (_sslLock)
        {
            ThrowIfDisposed();
            LibSsl.ERR_clear_error();
            int r;
            fixed (byte* p = plaintext)
            {
                r = LibSsl.SSL_write(_ssl, p, plaintext.Length);
            }
            if (r != plaintext.Length)
            {
                throw new IOException($"TLS: {LibSsl.TakeError()}");
            }
        }
    }

    public override async Task FlushAsync(CancellationToken cancellationToken)
    {
        await _sendLock.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            await DrainAsync(cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            _sendLock.Release();
        }
    }

    /// <summary>Sends the ciphertext libssl has made. The caller holds the send lock.</summary>
    private async ValueTask DrainAsync(CancellationToken cancellationToken)
    {
        while (TakeOutput() is { } output)
        {
            try
            {
                await _transport.WriteAsync(output.Buffer.AsMemory(0, output.Length), cancellationToken).ConfigureAwait(false);
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(output.Buffer);
            }
        }
        await _transport.FlushAsync(cancellationToken).ConfigureAwait(false);
    }

    private unsafe (byte[] Buffer, int Length)? TakeOutput()
    {
        lock (_sslLock)
        {
            if (_disposed != 0)
            {
                return null;
            }
            var pending = LibSsl.Pending(_writeBio);
            if (pending <= 0)
            {
                return null;
            }
            var buffer = ArrayPool<byte>.Shared.Rent(pending);
            int n;
            fixed (byte* p = buffer)
            {
                n = LibSsl.BIO_read(_writeBio, p, pending);
            }
            return (buffer, Math.Max(n, 0));
        }
    }

    // ------------------------------------------------------------------ keys (called by libssl)

    private static PskTlsStream? Of(nint ssl)
    {
        var handle = LibSsl.SSL_get_ex_data(ssl, 0);
        return handle == 0 ? null : GCHandle.FromIntPtr(handle).Target as PskTlsStream;
    }

    /// <summary>Server: the key for the identity the client named, from keys.psk (read at each handshake, as GnuTLS does).</summary>
    [UnmanagedCallersOnly(CallConvs = [typeof(CallConvCdecl)])]
    private static unsafe uint ServerKey(nint ssl, byte* identity, byte* psk, uint maxPskLength)
    {
#pragma warning disable CA1031 // nothing may unwind into libssl; a failed lookup is an unknown identity
        try
        {
            if (Of(ssl) is not { } self || identity is null)
            {
                return 0;
            }
            var name = Marshal.PtrToStringUTF8((nint)identity) ?? "";
            var key = self._credentials.ServerKey(name, out var problem);
            if (key is null || key.Length > maxPskLength)
            {
                self._keyProblem = problem;
                return 0;
            }
            key.CopyTo(new Span<byte>(psk, (int)maxPskLength));
            self.PeerIdentity = name;
            return (uint)key.Length;
        }
        catch
        {
            return 0;
        }
#pragma warning restore CA1031
    }

    /// <summary>Client: our username and its key.</summary>
    [UnmanagedCallersOnly(CallConvs = [typeof(CallConvCdecl)])]
    private static unsafe uint ClientKey(nint ssl, byte* hint, byte* identity, uint maxIdentityLength, byte* psk, uint maxPskLength)
    {
#pragma warning disable CA1031 // as above
        try
        {
            if (Of(ssl) is not { } self || self._credentials.ClientKey is not { } key)
            {
                return 0;
            }
            var name = Encoding.UTF8.GetBytes(self._credentials.Username);
            if (name.Length + 1 > maxIdentityLength || key.Length > maxPskLength)
            {
                self._keyProblem = "Username for PSK credentials is too long";
                return 0;
            }
            var destination = new Span<byte>(identity, (int)maxIdentityLength);
            name.CopyTo(destination);
            destination[name.Length] = 0;
            key.CopyTo(new Span<byte>(psk, (int)maxPskLength));
            return (uint)key.Length;
        }
        catch
        {
            return 0;
        }
#pragma warning restore CA1031
    }

    // ------------------------------------------------------------------ Stream

    public override bool CanRead => true;

    public override bool CanWrite => true;

    public override bool CanSeek => false;

    public override long Length => throw new NotSupportedException();

    public override long Position
    {
        get => throw new NotSupportedException();
        set => throw new NotSupportedException();
    }

    public override int Read(byte[] buffer, int offset, int count) =>
        ReadAsync(buffer.AsMemory(offset, count)).AsTask().GetAwaiter().GetResult();

    public override void Write(byte[] buffer, int offset, int count) =>
        WriteAsync(buffer.AsMemory(offset, count)).AsTask().GetAwaiter().GetResult();

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override void Flush() => FlushAsync(CancellationToken.None).GetAwaiter().GetResult();

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();

    private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_disposed != 0, this);

    public override async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }
        // A close_notify, best effort: the peer may already be gone.
        var (closeNotify, length) = TakeCloseNotify();
        if (closeNotify is not null && await _sendLock.WaitAsync(TimeSpan.FromSeconds(1)).ConfigureAwait(false))
        {
            try
            {
                using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(1));
                await _transport.WriteAsync(closeNotify.AsMemory(0, length), timeout.Token).ConfigureAwait(false);
            }
            catch (Exception e) when (e is IOException or OperationCanceledException or ObjectDisposedException or NotSupportedException)
            {
            }
            finally
            {
                _sendLock.Release();
            }
        }
        Release();
        await base.DisposeAsync().ConfigureAwait(false);
    }

    private unsafe (byte[]? Bytes, int Length) TakeCloseNotify()
    {
        lock (_sslLock)
        {
            _ = LibSsl.SSL_shutdown(_ssl);
            LibSsl.ERR_clear_error();
            var pending = LibSsl.Pending(_writeBio);
            if (pending <= 0)
            {
                return (null, 0);
            }
            var bytes = new byte[pending];
            fixed (byte* p = bytes)
            {
                return (bytes, Math.Max(LibSsl.BIO_read(_writeBio, p, pending), 0));
            }
        }
    }

    protected override void Dispose(bool disposing)
    {
        if (Interlocked.Exchange(ref _disposed, 1) == 0)
        {
            Release();
        }
        base.Dispose(disposing);
    }

    private void Release()
    {
        lock (_sslLock)
        {
            LibSsl.SSL_free(_ssl);
            if (_self.IsAllocated)
            {
                _self.Free();
            }
        }
        // _sendLock is not disposed: a writer may still be inside it, and it holds no handle (no wait handle is ever asked for).
    }
}
